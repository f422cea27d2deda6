"""How a sequence is cut into chunks: uniform, explicit, or FLOP-balanced.

Causal attention makes later chunks dearer (chunk j's queries read every earlier key),
so equal-token chunks leave the pipeline unbalanced. ``balanced_partition`` is the
paper's computation-wise partition: it equalises the chunks' forward FLOPs under the
one FLOP model of :mod:`pipelining_seq.flops` (where it lives; re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .flops import balanced_partition, check_chunk_counts, chunk_cost

__all__ = [
    "SeqPartition",
    "balanced_partition",
    "chunk_cost",
    "resolve_partition",
    "uniform_partition",
]

SeqPartition = str | Sequence[int] | Callable[[int], Sequence[int]]


def uniform_partition(seq_len: int, n_chunks: int) -> list[int]:
    """``n_chunks`` equal chunks; the sequence length must divide evenly."""
    check_chunk_counts(seq_len, n_chunks)
    if seq_len % n_chunks:
        fits = [k for k in range(1, min(seq_len, 64) + 1) if seq_len % k == 0]
        near = [s for s in (seq_len - seq_len % n_chunks, seq_len - seq_len % n_chunks + n_chunks)]
        raise ValueError(
            f"seq_partition='uniform' needs the sequence length ({seq_len}) to be divisible by "
            f"n_seq_chunks ({n_chunks}): use a sequence length such as {near[0]} or {near[1]}, "
            f"n_seq_chunks in {fits}, or pass explicit chunk lengths / 'balanced'"
        )
    return [seq_len // n_chunks] * n_chunks


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
