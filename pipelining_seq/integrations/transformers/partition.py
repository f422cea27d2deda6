"""FLOP-balanced chunk lengths from a Hugging Face config.

Reads ``num_hidden_layers, hidden_size, num_attention_heads, intermediate_size,
vocab_size, num_key_value_heads, head_dim`` into the package's one FLOP model
(:class:`pipelining_seq.flops.FlopModel`); ``hidden_act`` ``"silu"`` (gate, up and down
projections, as every Llama-family MLP) is SwiGLU. Other activations say nothing about
the MLP's shape (Gemma's GELU MLP is gated, GPT-2's is not): pass ``mlp="swiglu"`` (three
matrices) or ``mlp="gelu"`` (two). The result plugs into the schedules' ``seq_partition=``::

    ScheduleSeq1F1B(stage, m, loss_fn, n_seq_chunks=4,
                    seq_partition=balanced_seq_partition(model.config, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...flops import FlopModel

__all__ = ["balanced_partition_from_config", "balanced_seq_partition", "flop_model_from_config"]

_SWIGLU = ("silu", "swish")


def _text(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _field(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise ValueError(
            f"{type(config).__name__} has no {name}: the FLOP model reads num_hidden_layers, hidden_size, "
            "num_attention_heads, intermediate_size and vocab_size from the config"
        )
    return value


def flop_model_from_config(config: Any, *, mlp: str | None = None) -> FlopModel:
    """The :class:`~pipelining_seq.flops.FlopModel` of a Hugging Face decoder config.

    ``mlp``: ``"swiglu"`` (gated: three matrices) or ``"gelu"`` (two); default: SwiGLU
    for ``hidden_act="silu"``, otherwise it must be given."""
    config = _text(config)
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if mlp is None:
        if act not in _SWIGLU:
            raise ValueError(
                f"{type(config).__name__}.hidden_act={act!r}: only {list(_SWIGLU)} is known to mean a gated "
                "(SwiGLU, three-matrix) MLP; pass mlp='swiglu' for a gated MLP or mlp='gelu' for a two-matrix one"
            )
        mlp = "swiglu"
    head_dim = getattr(config, "head_dim", None)
    return FlopModel(
        num_layers=_field(config, "num_hidden_layers"),
        hidden_size=_field(config, "hidden_size"),
        num_heads=_field(config, "num_attention_heads"),
        ffn_hidden_size=_field(config, "intermediate_size"),
        vocab_size=_field(config, "vocab_size"),
        num_kv_heads=getattr(config, "num_key_value_heads", None),
        mlp=mlp,
        head_dim=head_dim,
        v_head_dim=head_dim,
    )


def balanced_partition_from_config(config: Any, seq_len: int, n_chunks: int, *, multiple_of: int = 1,
                                   mlp: str | None = None) -> list[int]:
    """Chunk lengths (first to last) of equal modelled forward FLOPs for this config
    (:meth:`FlopModel.balanced_partition <pipelining_seq.flops.FlopModel.balanced_partition>`)."""
    return flop_model_from_config(config, mlp=mlp).balanced_partition(seq_len, n_chunks, multiple_of=multiple_of)


def balanced_seq_partition(config: Any, n_chunks: int, *, multiple_of: int = 1,
                           mlp: str | None = None) -> Callable[[int], list[int]]:
    """A ``seq_partition=`` callable ``seq_len -> lengths`` for the schedules."""
    model = flop_model_from_config(config, mlp=mlp)
    model.balanced_partition(max(n_chunks, 1) * multiple_of, n_chunks, multiple_of=multiple_of)  # fail early

    def partition(seq_len: int) -> list[int]:
        return model.balanced_partition(seq_len, n_chunks, multiple_of=multiple_of)

    return partition
