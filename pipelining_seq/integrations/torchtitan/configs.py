"""torchtitan config functions for CPU runs: ``--module pipelining_seq.integrations.torchtitan.configs``.

torchtitan's language models default to flex attention, which has no backward on CPU, so
these are its debug models with torchtitan's own ``ScaledDotProductAttention`` (plain
causal): the baseline schedules (1F1B, Interleaved1F1B, ...) train with them on CPU, and
the Seq1F1B schedules convert that attention like any other. ``llama3_seq1f1b_section`` is
the config-file route: a ``Seq1F1BTrainer.Config`` with a ``seq1f1b`` section, as a user's
``config_registry`` would write it.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any

from torch import nn

__all__ = ["deepseek_v3_sdpa", "llama3_sdpa", "llama3_seq1f1b_section", "qwen3_sdpa"]


def _registry(model: str) -> Any:
    return importlib.import_module(f"torchtitan.models.{model}.config_registry")


def _sdpa(config: Any) -> Any:
    from torchtitan.models.common.attention import BaseAttention, ScaledDotProductAttention

    for _, cfg, _, _ in config.model_spec.model.traverse(BaseAttention.Config):
        cfg.inner_attention = ScaledDotProductAttention.Config()
    return config


def llama3_sdpa() -> Any:
    """torchtitan's ``llama3_debugmodel`` (6 layers, dim 256) with SDPA attention."""
    return _sdpa(_registry("llama3").llama3_debugmodel())


def qwen3_sdpa() -> Any:
    """``qwen3_debugmodel`` with SDPA attention and untied embeddings (torchtitan refuses tying under PP)."""
    config = _sdpa(_registry("qwen3").qwen3_debugmodel())
    model = config.model_spec.model
    model.enable_weight_tying = False
    model.tok_embeddings.param_init = {"weight": partial(nn.init.normal_, std=1.0)}  # was tied: no init
    return config


def deepseek_v3_sdpa() -> Any:
    """``deepseek_v3_debugmodel`` (MLA, MoE) with SDPA attention."""
    return _sdpa(_registry("deepseek_v3").deepseek_v3_debugmodel())


def llama3_seq1f1b_section() -> Any:
    """``llama3_sdpa`` as a ``Seq1F1BTrainer.Config``: k=4, balanced chunks, plain cross-entropy."""
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.models.common.config_utils import decoder_vocab_size

    from .config import Seq1F1BConfig
    from .trainer import Seq1F1BTrainer

    base = llama3_sdpa()
    values = {name: getattr(base, name) for name in base.__dataclass_fields__ if not name.startswith("_")}
    values["loss"] = CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(base.model_spec))
    return Seq1F1BTrainer.Config(**values, seq1f1b=Seq1F1BConfig(n_seq_chunks=4, partition="balanced"))
