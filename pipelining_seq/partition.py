"""How a sequence is cut into chunks: uniform, explicit, or FLOP-balanced.

Causal attention makes later chunks dearer (chunk j's queries read every earlier key),
so equal-token chunks leave the pipeline unbalanced. ``balanced_partition`` is the
paper's computation-wise partition: it equalises the modelled forward FLOPs of the chunks,
solving from the last chunk backwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "SeqPartition",
    "balanced_partition",
    "chunk_cost",
    "resolve_partition",
    "uniform_partition",
]

SeqPartition = str | Sequence[int] | Callable[[int], Sequence[int]]


def chunk_cost(
    length: float,
    end: float,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int,
    vocab_size: int,
) -> float:
    """Modelled forward FLOPs of a chunk of ``length`` tokens ending at position ``end``.

    ``4·s·H·V + L·[α·(s·P − s²/2) + β·s]`` with ``α = (4d+3)·h`` (QKᵀ and AV per
    query/key pair and head, plus softmax) and ``β = 8H² + 4H·F`` (Q/K/V/O projections
    and a non-gated MLP); see docs/design.md.
    """
    d = hidden_size / num_heads
    alpha = (4 * d + 3) * num_heads
    beta = 8 * hidden_size**2 + 4 * hidden_size * ffn_hidden_size
    s, p = length, end
    return 4 * s * hidden_size * vocab_size + num_layers * (alpha * (s * p - s * s / 2) + beta * s)


def _check_counts(seq_len: int, n_chunks: int, multiple_of: int = 1) -> None:
    if n_chunks < 1:
        raise ValueError(f"n_seq_chunks={n_chunks}: need at least 1 chunk")
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of}: must be a positive integer")
    if seq_len % multiple_of:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of multiple_of={multiple_of}: "
            "change the sequence length or multiple_of"
        )
    if n_chunks * multiple_of > seq_len:
        raise ValueError(
            f"{n_chunks} chunks of at least {multiple_of} tokens do not fit a sequence of "
            f"{seq_len} tokens: lower n_seq_chunks to at most {seq_len // multiple_of}"
        )


def uniform_partition(seq_len: int, n_chunks: int) -> list[int]:
    """``n_chunks`` equal chunks; the sequence length must divide evenly."""
    _check_counts(seq_len, n_chunks)
    if seq_len % n_chunks:
        fits = [k for k in range(1, min(seq_len, 64) + 1) if seq_len % k == 0]
        near = [s for s in (seq_len - seq_len % n_chunks, seq_len - seq_len % n_chunks + n_chunks)]
        raise ValueError(
            f"seq_partition='uniform' needs the sequence length ({seq_len}) to be divisible by "
            f"n_seq_chunks ({n_chunks}): use a sequence length such as {near[0]} or {near[1]}, "
            f"n_seq_chunks in {fits}, or pass explicit chunk lengths / 'balanced'"
        )
    return [seq_len // n_chunks] * n_chunks


def balanced_partition(
    seq_len: int,
    n_chunks: int,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int,
    vocab_size: int,
    multiple_of: int = 1,
) -> list[int]:
    """Chunk lengths (first to last) whose modelled forward FLOPs are equal.

    Solves from the last chunk backwards: with the chunk ending at ``P``, the length
    ``s`` with ``chunk_cost(s, P) = total / n_chunks`` is the smaller root of a quadratic;
    it is rounded down to ``multiple_of`` and the first chunk takes the remainder.
    For the 7B model at 32k and k=4 this gives 11024, 8416, 7088, 6240 (about).
    """
    for name, val in (
        ("num_layers", num_layers), ("hidden_size", hidden_size), ("num_heads", num_heads),
        ("ffn_hidden_size", ffn_hidden_size), ("vocab_size", vocab_size),
    ):
        if val < 1:
            raise ValueError(f"balanced_partition: {name}={val} must be positive")
    _check_counts(seq_len, n_chunks, multiple_of)
    dims = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        ffn_hidden_size=ffn_hidden_size, vocab_size=vocab_size,
    )
    d = hidden_size / num_heads
    alpha = (4 * d + 3) * num_heads
    beta = 8 * hidden_size**2 + 4 * hidden_size * ffn_hidden_size
    target = chunk_cost(seq_len, seq_len, **dims) / n_chunks
    a = num_layers * alpha / 2
    parts: list[int] = []
    end = seq_len
    for i in range(n_chunks - 1):
        b = 4 * hidden_size * vocab_size + num_layers * (alpha * end + beta)
        s = (b - math.sqrt(max(b * b - 4 * a * target, 0.0))) / (2 * a)
        # Keep room for the chunks still to place in front, each at least multiple_of.
        remaining_after = n_chunks - 1 - i
        s = min(s, end - remaining_after * multiple_of)
        s = max(multiple_of, int(s // multiple_of) * multiple_of)
        parts.insert(0, s)
        end -= s
    parts.insert(0, end)
    return parts


def resolve_partition(partition: SeqPartition, seq_len: int, n_chunks: int) -> list[int]:
    """Chunk lengths for ``seq_len`` from a ``seq_partition`` setting, validated."""
    if isinstance(partition, str):
        if partition != "uniform":
            raise ValueError(
                f"seq_partition={partition!r}: use 'uniform', a list of chunk lengths, or a "
                "callable seq_len -> lengths (e.g. functools.partial(balanced_partition, ...))"
            )
        return uniform_partition(seq_len, n_chunks)
    lengths = list(partition(seq_len) if callable(partition) else partition)
    if len(lengths) != n_chunks:
        raise ValueError(
            f"seq_partition gives {len(lengths)} chunk lengths {lengths} but n_seq_chunks="
            f"{n_chunks}: make them agree"
        )
    if any(int(s) != s or s <= 0 for s in lengths):
        raise ValueError(
            f"seq_partition {lengths}: every chunk length must be a positive integer "
            "(zero-length chunks are not allowed)"
        )
    if sum(lengths) != seq_len:
        raise ValueError(
            f"seq_partition {lengths} sums to {sum(lengths)} but the sequence has {seq_len} "
            "tokens: chunk lengths must sum to the sequence length"
        )
    return [int(s) for s in lengths]
