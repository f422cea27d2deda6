"""Seq1F1B-I (interleaved) and Seq1F1B-ZB (I/W split) action orders as data.

Pure functions, no process group: each returns, per rank, a compute-only list of
``(kind, stage, unit)`` with kind ``"F"``, ``"B"``, ``"I"`` or ``"W"``, and
:func:`to_actions` turns it into torch's ``_Action`` IR. A unit is (micro-batch n,
chunk j) with id ``u = n*k + j``; the chunk a unit runs is always ``u % k``, read
from the unit itself.

Seq1F1B-I, v stages per rank in loop placement (rank r holds stages r, r+p, ...).
As in the official code, virtual stages switch every G units and rank r runs
``(v-1)*G + 2*(p-r-1) + (k-1)`` warm-up forwards. The official code fixes G = p
and takes the chunk from a global counter, which is only right when k divides p.
Here G is ``g*k`` units, whole micro-batches: ``g = ceil(p/k)`` micro-batches per
group (``g*k = p`` when k divides p: then the official order whenever m is a multiple
of p above p; at m = p the official code runs every forward first), grown like torch's
interleaved rounds when m is a larger multiple. Whole micro-batches per group keep each
group's LIFO backwards inside the forwards already run; with k not dividing p the
official loop runs forwards on the wrong chunks, silently
(``tests/unit/test_official_interleaved.py``). Orders that still cannot run (few units)
are refused by :func:`check_deadlock_free`.

Seq1F1B-ZB (ZB-H1 over units), one stage per rank: Seq1F1B's warm-up
``p-r-1 + k-1`` forwards, then F and I alternate; rank r defers its first r weight
passes (W) and runs them in the cool-down bubble, so every rank holds at most
``p + k - 1`` units (Seq1F1B's rank-0 peak). W follows the I order, which matters on
the first stage: torch runs the whole backward there in W (its inputs need no
gradient), so the K/V gradient relay happens in W and must stay LIFO.
"""

from __future__ import annotations

from .registry import Action, peak_live_units
from .schedule_ir import backward_unit_order

__all__ = [
    "check_deadlock_free",
    "check_stage_orders",
    "interleaved_group_size",
    "interleaved_orders",
    "interleaved_warmup",
    "peak_live_units_multi",
    "to_actions",
    "zero_bubble_orders",
]

Op = Action  # (kind, stage_index, unit)


def interleaved_group_size(num_ranks: int, n_microbatches: int, n_seq_chunks: int) -> int:
    """Units per virtual-stage switch, a whole number of micro-batches (see module docs)."""
    p, m, k = num_ranks, n_microbatches, n_seq_chunks
    g = -(-p // k)  # micro-batches per group, ceil(p / k)
    rounds = max(1, m // g)
    if m % rounds:
        raise ValueError(
            f"Seq1F1B-I: n_microbatches={m} must be a multiple of the number of rounds "
            f"{rounds} (= n_microbatches // ceil(pp_size {p} / n_seq_chunks {k})): use "
            f"n_microbatches a multiple of {g}, or at most {g}"
        )
    return (m // rounds) * k


def interleaved_warmup(num_ranks: int, rank: int, n_local: int, n_microbatches: int, n_seq_chunks: int) -> int:
    """Warm-up forwards of ``rank``: ``(v-1)*G + 2*(p-r-1) + (k-1)``, capped at v*m*k."""
    p, v, m, k = num_ranks, n_local, n_microbatches, n_seq_chunks
    g = interleaved_group_size(p, m, k)
    return min((v - 1) * g + 2 * (p - rank - 1) + (k - 1), v * m * k)


def interleaved_orders(num_ranks: int, n_local: int, n_microbatches: int, n_seq_chunks: int) -> dict[int, list[Op]]:
    """Seq1F1B-I compute order of every rank, stages in loop placement."""
    p, v, m, k = num_ranks, n_local, n_microbatches, n_seq_chunks
    group = interleaved_group_size(p, m, k)
    return {r: _interleaved_rank(p, r, v, m, k, group) for r in range(p)}


def _interleaved_rank(p: int, r: int, v: int, m: int, k: int, group: int) -> list[Op]:
    # Virtual stage of the i-th forward / backward: switch every ``group`` units; the
    # unit is the next one of that stage (forwards in unit order, backwards LIFO).
    bwd_units = backward_unit_order(m, k)
    total = v * m * k
    warm = interleaved_warmup(p, r, v, m, k)
    fwd_next = [0] * v
    bwd_next = [0] * v
    ops: list[Op] = []
    fwd_i = bwd_i = 0

    def fwd() -> Op:
        nonlocal fwd_i
        local = (fwd_i // group) % v
        fwd_i += 1
        fwd_next[local] += 1
        return Action("F", local * p + r, fwd_next[local] - 1)

    def bwd() -> Op:
        nonlocal bwd_i
        local = v - 1 - (bwd_i // group) % v
        bwd_i += 1
        bwd_next[local] += 1
        return Action("B", local * p + r, bwd_units[bwd_next[local] - 1])

    ops += [fwd() for _ in range(warm)]
    for _ in range(total - warm):
        ops.append(fwd())
        ops.append(bwd())
    ops += [bwd() for _ in range(warm)]
    return ops


def zero_bubble_orders(num_ranks: int, n_microbatches: int, n_seq_chunks: int) -> dict[int, list[Op]]:
    """Seq1F1B-ZB (H1) compute order of every rank, one stage per rank."""
    p, m, k = num_ranks, n_microbatches, n_seq_chunks
    n_units = m * k
    bwd_units = backward_unit_order(m, k)
    orders: dict[int, list[Op]] = {}
    for r in range(p):
        warm = min(p - r - 1 + k - 1, n_units)
        ops: list[Op] = [Action("F", r, u) for u in range(warm)]
        n_w = 0
        for i in range(n_units):
            if warm + i < n_units:
                ops.append(Action("F", r, warm + i))
            ops.append(Action("I", r, bwd_units[i]))
            if i >= r:  # rank r defers its first r weight passes into the cool-down
                ops.append(Action("W", r, bwd_units[n_w]))
                n_w += 1
        ops += [Action("W", r, bwd_units[j]) for j in range(n_w, n_units)]
        orders[r] = ops
    return orders


def to_actions(orders: dict[int, list[Op]]) -> dict[int, list]:
    """torch ``_Action`` IR (compute only) from ``(kind, stage, unit)`` lists."""
    return {r: [Action(*op).to_torch() for op in ops] for r, ops in orders.items()}


def check_stage_orders(orders: dict[int, list[Op]], num_stages: int, n_microbatches: int, n_seq_chunks: int) -> None:
    """Raise ValueError unless every stage respects Seq1F1B's same-stage dependencies.

    Forwards in unit order (K/V cache); input backwards (B or I) LIFO over a
    micro-batch's chunks (K/V gradient relay); each W after its I; on stage 0, where
    torch runs the whole backward in W, W also LIFO.
    """
    k, n_units = n_seq_chunks, n_microbatches * n_seq_chunks
    per_stage: dict[int, list[tuple[str, int]]] = {s: [] for s in range(num_stages)}
    for ops in orders.values():
        for t, s, u in ops:
            per_stage[s].append((t, u))
    for s, ops in per_stage.items():
        fwd = [u for t, u in ops if t == "F"]
        if fwd != list(range(n_units)):
            raise ValueError(f"stage {s}: forwards must run in unit order, got {fwd}")
        done: dict[str, set[int]] = {"F": set(), "B": set(), "W": set()}
        for t, u in ops:
            kind = "B" if t in ("B", "I") else t
            if kind == "B" and u not in done["F"]:
                raise ValueError(f"stage {s}: backward of unit {u} before its forward")
            if t == "W" and u not in done["B"]:
                raise ValueError(f"stage {s}: W of unit {u} before its I")
            lifo = kind == "B" or (t == "W" and s == 0)
            if lifo and u % k != k - 1 and u + 1 not in done[kind]:
                raise ValueError(f"stage {s}: {t} of unit {u} before unit {u + 1}'s: chunks must go LIFO")
            if u in done[kind]:
                raise ValueError(f"stage {s}: {t} of unit {u} twice")
            done[kind].add(u)
        if len(done["B"]) != n_units:
            raise ValueError(f"stage {s}: {n_units} forwards but {len(done['B'])} backwards")


def check_deadlock_free(orders: dict[int, list[Op]], num_stages: int) -> int:
    """Run the orders against each other with blocking receives; return the steps taken.

    A forward needs the previous stage's forward of the unit, an input backward the next
    stage's. Raises ValueError naming the stuck actions if no rank can progress.
    """
    pos = {r: 0 for r in orders}
    done: set[tuple[str, int, int]] = set()
    steps = 0
    while any(pos[r] < len(orders[r]) for r in orders):
        ready = []
        for r, ops in orders.items():
            if pos[r] == len(ops):
                continue
            t, s, u = ops[pos[r]]
            if t == "F":
                ok = s == 0 or ("F", s - 1, u) in done
            elif t in ("B", "I"):
                ok = s == num_stages - 1 or ("B", s + 1, u) in done
            else:
                ok = True
            if ok:
                ready.append(r)
        if not ready:
            stuck = {r: orders[r][pos[r]] for r in orders if pos[r] < len(orders[r])}
            raise ValueError(f"the order deadlocks: every rank waits, next actions {stuck}")
        for r in ready:
            t, s, u = orders[r][pos[r]]
            done.add(("B" if t in ("B", "I") else t, s, u))
            pos[r] += 1
        steps += 1
    return steps


def peak_live_units_multi(ops: list[Op]) -> int:
    """Most units (over all of a rank's stages) forwarded and not yet through B or W
    (:func:`pipelining_seq.registry.peak_live_units`, the one rule)."""
    return peak_live_units(ops)
