"""How a sequence is cut into chunks: uniform, explicit, or FLOP-balanced.

Causal attention makes later chunks dearer (chunk j's queries read every earlier key),
so equal-token chunks leave the pipeline unbalanced. ``balanced_partition`` is the
paper's computation-wise partition: it equalises the chunks' forward FLOPs under the
one FLOP model of :mod:`pipelining_seq.flops` (where it lives; re-exported here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .flops import balanced_partition, check_chunk_counts, chunk_cost

__all__ = [
    "PARTITION_NAMES",
    "SeqPartition",
    "balanced_partition",
    "chunk_cost",
    "resolve_partition",
    "uniform_partition",
]

SeqPartition = str | Sequence[int] | Callable[[int], Sequence[int]]

PARTITION_NAMES = ("uniform", "balanced", "calibrated")
"""The partitions known by name (:func:`resolve_partition`, the one place they are resolved)."""


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


def resolve_partition(
    partition: SeqPartition,
    seq_len: int,
    n_chunks: int,
    *,
    flop_model: Any = None,
    calibrated: Any = None,
    multiple_of: int = 1,
) -> list[int]:
    """Chunk lengths for ``seq_len`` from a ``seq_partition`` setting, validated.

    Names (any capitalisation): ``"uniform"``; ``"balanced"``, equal modelled FLOPs under
    ``flop_model`` (a :class:`~pipelining_seq.flops.FlopModel`); ``"calibrated"``, equal
    measured cost under ``calibrated`` (a fitted cost model with the same
    ``balanced_partition(seq_len, n_chunks, multiple_of=)`` method, or a mapping
    ``n_chunks -> lengths``). ``multiple_of`` rounds the lengths of the last two.
    """
    if isinstance(partition, str):
        name = partition.lower()
        if name == "uniform":
            return uniform_partition(seq_len, n_chunks)
        if name == "balanced" and flop_model is not None:
            partition = functools.partial(flop_model.balanced_partition, n_chunks=n_chunks, multiple_of=multiple_of)
        elif name == "calibrated" and isinstance(calibrated, Mapping):
            if n_chunks not in calibrated:
                raise ValueError(
                    f"seq_partition='calibrated': no calibrated lengths for n_seq_chunks={n_chunks} "
                    f"(calibrated for {sorted(calibrated)}): calibrate for {n_chunks} chunks"
                )
            partition = list(calibrated[n_chunks])
        elif name == "calibrated" and calibrated is not None:
            partition = functools.partial(calibrated.balanced_partition, n_chunks=n_chunks, multiple_of=multiple_of)
        elif name in ("balanced", "calibrated"):
            knob = "flop_model (the FLOP model it balances)" if name == "balanced" else "calibrated (a measured cost model)"
            raise ValueError(f"seq_partition={partition!r} needs {knob}: pass it next to seq_partition")
        else:
            raise ValueError(
                f"seq_partition={partition!r}: use one of {', '.join(PARTITION_NAMES)}, a list of chunk "
                "lengths, or a callable seq_len -> lengths"
            )
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
