"""torchtitan config functions for the end-to-end tests (``--module titan_configs --config NAME``).

torchtitan's language models default to flex attention, which has no backward on CPU,
so CPU baselines swap in torchtitan's own ``ScaledDotProductAttention`` (plain causal).
``llama3_seq1f1b_section`` is the config-file route: a ``Seq1F1BTrainer.Config`` with a
``seq1f1b`` section, as a user's ``config_registry`` would write it.
"""

from __future__ import annotations

import importlib
from functools import partial

from torch import nn
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.models.common.attention import BaseAttention, ScaledDotProductAttention
from torchtitan.models.common.config_utils import decoder_vocab_size

from pipelining_seq.integrations.torchtitan import Seq1F1BConfig, Seq1F1BTrainer


def _registry(model: str):
    return importlib.import_module(f"torchtitan.models.{model}.config_registry")


def _sdpa(config):
    for _, cfg, _, _ in config.model_spec.model.traverse(BaseAttention.Config):
        cfg.inner_attention = ScaledDotProductAttention.Config()
    return config


def llama3_sdpa():
    return _sdpa(_registry("llama3").llama3_debugmodel())


def llama3_flex():
    return _registry("llama3").llama3_debugmodel()


def qwen3_sdpa():
    config = _sdpa(_registry("qwen3").qwen3_debugmodel())
    model = config.model_spec.model
    model.enable_weight_tying = False  # torchtitan: weight tying is not supported with PP
    model.tok_embeddings.param_init = {"weight": partial(nn.init.normal_, std=1.0)}  # was tied: no init
    return config


def deepseek_v3_sdpa():
    return _sdpa(_registry("deepseek_v3").deepseek_v3_debugmodel())


def llama3_seq1f1b_section():
    base = llama3_sdpa()
    values = {name: getattr(base, name) for name in base.__dataclass_fields__ if not name.startswith("_")}
    values["loss"] = CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(base.model_spec))
    return Seq1F1BTrainer.Config(**values, seq1f1b=Seq1F1BConfig(n_seq_chunks=4, partition="balanced"))
