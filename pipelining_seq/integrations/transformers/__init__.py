"""Seq1F1B for Hugging Face transformers causal language models (``pip install 'pipelining_seq[hf]'``).

* :func:`enable` makes a model chunk-aware in place (attention, positions, packed
  documents, sliding windows) or refuses what it cannot run exactly;
* :func:`split_causal_lm` cuts a ``*ForCausalLM`` into the stage module of a
  :class:`~pipelining_seq.SequencePipelineStage`, with the model's own parameter names;
* :func:`flop_model_from_config` / :func:`balanced_partition_from_config` /
  :func:`balanced_seq_partition` give FLOP-balanced chunk lengths from the HF config.

See docs/transformers.md.
"""

from .attention import ATTENTION_ATTR, IMPLEMENTATION, chunked_attention_forward, enable
from .partition import balanced_partition_from_config, balanced_seq_partition, flop_model_from_config
from .split import CausalLMStage, split_causal_lm

__all__ = [
    "ATTENTION_ATTR",
    "IMPLEMENTATION",
    "CausalLMStage",
    "balanced_partition_from_config",
    "balanced_seq_partition",
    "chunked_attention_forward",
    "enable",
    "flop_model_from_config",
    "split_causal_lm",
]
