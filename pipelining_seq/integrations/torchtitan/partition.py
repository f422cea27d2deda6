"""Chunk lengths for a torchtitan run: model sizes read from its config, one FLOP model.

Partition names are resolved by the core's :func:`pipelining_seq.partition.resolve_partition`,
as for the trainer; ``balanced`` gets a :class:`~pipelining_seq.flops.FlopModel` with the
sizes of torchtitan's model config: hidden size, heads, KV heads (GQA), query/key and
value head sizes (MLA), SwiGLU feed-forward width (for MoE layers the active width:
``top_k`` routed experts plus the shared ones), vocabulary and layer count.
``multiple_of`` is the least common multiple of ``loss.num_chunks`` (torchtitan's
``ChunkedLossWrapper`` cuts every chunk's tokens that many ways) and the tensor-parallel
degree under sequence parallelism (each chunk's tokens are sharded across TP ranks).
"""

from __future__ import annotations

import math
from typing import Any

from ...flops import FlopModel
from ...partition import resolve_partition

__all__ = ["chunk_multiple", "flop_model", "model_flop_sizes", "resolve_lengths"]


def _ffn_width(layer: Any) -> tuple[int, str]:
    ff = getattr(layer, "feed_forward", None)
    if ff is not None:
        return ff.w1.out_features, ("swiglu" if getattr(ff, "w3", None) is not None else "gelu")
    moe = getattr(layer, "moe", None)
    if moe is None:
        raise ValueError(f"{type(layer).__qualname__}: no feed_forward or moe to size the balanced partition")
    experts = moe.routed_experts.inner_experts
    top_k = moe.router.top_k
    width = experts.hidden_dim * top_k
    if moe.shared_experts is not None:
        width += moe.shared_experts.w1.out_features
    return width, "swiglu"


def model_flop_sizes(model_config: Any) -> dict[str, Any]:
    """The :class:`~pipelining_seq.flops.FlopModel` fields read from a torchtitan model config."""
    layers = list(model_config.layers)
    if not layers:
        raise ValueError(f"{type(model_config).__qualname__} has no layers to size the balanced partition")
    hidden = model_config.dim
    attn = layers[0].attention
    n_heads = attn.n_heads
    if hasattr(attn, "qk_nope_head_dim"):  # MLA (deepseek_v3)
        head_dim = attn.qk_nope_head_dim + attn.qk_rope_head_dim
        v_head_dim, n_kv = attn.v_head_dim, n_heads
    else:
        head_dim = attn.head_dim or hidden // n_heads
        v_head_dim, n_kv = head_dim, attn.n_kv_heads or n_heads
    widths = [_ffn_width(layer) for layer in layers]
    ffn = round(sum(w for w, _ in widths) / len(widths))
    return dict(
        num_layers=len(layers), hidden_size=hidden, num_heads=n_heads, ffn_hidden_size=ffn,
        vocab_size=model_config.vocab_size, num_kv_heads=n_kv, mlp=widths[0][1],
        head_dim=head_dim, v_head_dim=v_head_dim,
    )


def chunk_multiple(*, loss_num_chunks: int | None, tp_degree: int, sequence_parallel: bool) -> int:
    m = 1
    if loss_num_chunks:
        m = math.lcm(m, loss_num_chunks)
    if sequence_parallel and tp_degree > 1:
        m = math.lcm(m, tp_degree)
    return m


def flop_model(model_config: Any) -> FlopModel:
    """The FLOP model of a torchtitan model config (what ``balanced`` balances)."""
    return FlopModel(**model_flop_sizes(model_config))


def resolve_lengths(
    partition: str | list[int], *, model_config: Any, seq_len: int, n_chunks: int, multiple_of: int
) -> list[int]:
    """Chunk lengths for ``partition`` (``uniform``, ``balanced`` or explicit lengths)."""
    if partition == "balanced" and seq_len % multiple_of:
        raise ValueError(
            f"--seq1f1b.partition balanced: training.seq_len {seq_len} is not a multiple of "
            f"{multiple_of} (loss.num_chunks / tensor-parallel degree), so no chunking fits"
        )
    fm = flop_model(model_config) if partition == "balanced" else None
    return resolve_partition(partition, seq_len, n_chunks, flop_model=fm, multiple_of=multiple_of)
