"""The Seq1F1B action order as data: pure functions, no process group needed.

A unit is (micro-batch n, chunk j) with id ``u = n*k + j``. Stage r runs
``W_r = min(p-r-1 + k-1, m*k)`` forwards, then alternates one forward and one backward,
then drains the remaining backwards. Forwards go in unit order; backwards go FIFO over
micro-batches and LIFO over chunks, because chunk j's K/V receive gradient from every
later chunk of the same micro-batch.
"""

from __future__ import annotations

from . import _compat

__all__ = [
    "backward_unit_order",
    "check_order",
    "compute_order",
    "peak_live_units",
    "pipeline_order",
    "warmup_units",
]


def warmup_units(num_stages: int, stage_index: int, n_microbatches: int, n_seq_chunks: int) -> int:
    """Forwards stage ``stage_index`` runs before its first backward (Seq1F1B warm-up)."""
    p, r, m, k = num_stages, stage_index, n_microbatches, n_seq_chunks
    return min(p - r - 1 + k - 1, m * k)


def backward_unit_order(n_microbatches: int, n_seq_chunks: int) -> list[int]:
    """Unit ids in backward order: micro-batches FIFO, chunks within one LIFO."""
    k = n_seq_chunks
    return [n * k + (k - 1 - j) for n in range(n_microbatches) for j in range(k)]


def compute_order(
    num_stages: int, stage_index: int, n_microbatches: int, n_seq_chunks: int
) -> list[tuple[str, int]]:
    """The ("F"|"B", unit) sequence of one stage."""
    total = n_microbatches * n_seq_chunks
    warm = warmup_units(num_stages, stage_index, n_microbatches, n_seq_chunks)
    bwd = backward_unit_order(n_microbatches, n_seq_chunks)
    order: list[tuple[str, int]] = [("F", u) for u in range(warm)]
    for i in range(total - warm):
        order.append(("F", warm + i))
        order.append(("B", bwd[i]))
    order.extend(("B", bwd[i]) for i in range(total - warm, total))
    return order


def pipeline_order(
    num_stages: int, n_microbatches: int, n_seq_chunks: int, *, with_reduce_grad: bool = True
) -> dict[int, list]:
    """torch's ``_Action`` IR for every rank, spaced with ``None`` like ``Schedule1F1B``'s.

    With ``n_seq_chunks=1`` this equals ``Schedule1F1B._get_pipeline_order()``.
    """
    p = num_stages
    order: dict[int, list] = {}
    for rank in range(p):
        ops = compute_order(p, rank, n_microbatches, n_seq_chunks)
        warm = warmup_units(p, rank, n_microbatches, n_seq_chunks)
        actions: list = [None] * rank
        actions += [_compat.Action(rank, _compat.FORWARD, u) for _, u in ops[:warm]]
        actions += [None] * (2 * (p - 1 - rank))
        steady = ops[warm:]
        n_pairs = n_microbatches * n_seq_chunks - warm
        for kind, u in steady[: 2 * n_pairs]:
            actions.append(_compat.Action(rank, _compat.FORWARD if kind == "F" else _compat.FULL_BACKWARD, u))
        for _, u in steady[2 * n_pairs:]:
            actions += [None, _compat.Action(rank, _compat.FULL_BACKWARD, u)]
        if with_reduce_grad:
            actions = _compat.add_reduce_grad(actions, n_microbatches * n_seq_chunks)
        order[rank] = actions
    return order


def peak_live_units(ops: list[tuple[str, int]]) -> int:
    """Most units whose forward ran and whose backward has not, over one stage's order
    (:func:`pipelining_seq.registry.peak_live_units`, the one rule)."""
    from .registry import peak_live_units as rule

    return rule(ops)


def check_order(ops: list[tuple[str, int]], n_microbatches: int, n_seq_chunks: int) -> None:
    """Raise ValueError unless ``ops`` respects Seq1F1B's per-stage dependencies.

    Forwards in unit order (chunk j reads chunk j-1's K/V); each backward after its
    forward; within a micro-batch, chunk j+1's backward before chunk j's (it relays K/V
    gradients to j).
    """
    k = n_seq_chunks
    fwd = [u for t, u in ops if t == "F"]
    if fwd != list(range(n_microbatches * k)):
        raise ValueError(f"forwards must run in unit order 0..{n_microbatches * k - 1}, got {fwd}")
    done_f: set[int] = set()
    done_b: set[int] = set()
    for t, u in ops:
        if t == "F":
            done_f.add(u)
            continue
        if u not in done_f:
            raise ValueError(f"backward of unit {u} before its forward")
        if u % k != k - 1 and u + 1 not in done_b:
            raise ValueError(f"backward of unit {u} (chunk {u % k}) before unit {u + 1}'s: chunks must go LIFO")
        done_b.add(u)
    if len(done_b) != len(fwd):
        raise ValueError(f"{len(fwd)} forwards but {len(done_b)} backwards")
