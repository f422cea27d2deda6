"""The official Seq1F1B-I loop, emulated as data, against design §9's claims and our order.

The official code (thunlp/Seq1F1B, ``forward_backward_pipelining_with_interleaving``) is
Megatron's interleaved 1F1B run over m·v·k iterations. What the emulation keeps of it:

* warm-up: every forward first when ``m == p`` (Megatron's "all warm-up" case), otherwise
  ``min((v-1)·p + 2·(p-r-1) + (k-1), m·v·k)``; ``m % p == 0`` is required;
* iteration i runs on model chunk ``(i mod p·v) // p`` (reversed for backwards): a switch
  every p iterations, whatever k is;
* the chunk index a forward uses (its RoPE positions, when its K/V cache restarts) is one
  counter per rank over all forward calls, ``i % k`` (``get_batch_sp``'s ``offset``);
* outputs and received gradients sit in per-model-chunk ``sp_queue``s: items are grouped
  k at a time by arrival, and a pop takes the last remaining item of the oldest group;
* messages between two stages arrive in the order they were sent, so the n-th forward of a
  stage reads the n-th activation of the stage before it (its unit is n), and the b-th
  backward receives the b-th gradient of the stage after it.

"Exact" then means: each forward's chunk index is its unit's ``n % k``; each stage's
backwards run FIFO over micro-batches and LIFO over chunks (the K/V gradient relay); each
backward is fed the gradient of its own unit.
"""

from __future__ import annotations

import pytest

from pipelining_seq import schedule_ir_multi
from pipelining_seq.schedule_ir import backward_unit_order


class _SpQueue:
    """The official ``sp_queue``: groups of k by arrival; pop = last remaining item of the oldest group."""

    def __init__(self, k: int):
        self.k, self.items, self.n_in = k, [], 0  # items: (arrival index, value)

    def append(self, value):
        self.items.append((self.n_in, value))
        self.n_in += 1

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty sp_queue")  # what the official code would raise
        oldest = min(i // self.k for i, _ in self.items)
        pick = max(j for j, (i, _) in enumerate(self.items) if i // self.k == oldest)
        return self.items.pop(pick)[1]


def official_iterations(p: int, r: int, v: int, m: int, k: int) -> list[tuple[str, int, int]]:
    """Rank r's ("F"|"B", iteration, model chunk) sequence in the official loop."""
    if m % p:
        raise ValueError(f"the official code refuses m={m} with p={p} (m % p != 0)")
    total = m * v * k
    warm = total if m == p else min((v - 1) * p + 2 * (p - r - 1) + (k - 1), total)

    def chunk(i: int, forward: bool) -> int:
        c = (i % (p * v)) // p
        return c if forward else v - 1 - c

    seq = [("F", i, chunk(i, True)) for i in range(warm)]
    for j in range(total - warm):
        seq += [("F", warm + j, chunk(warm + j, True)), ("B", j, chunk(j, False))]
    seq += [("B", i, chunk(i, False)) for i in range(total - warm, total)]
    return seq


def official_run(p: int, v: int, m: int, k: int) -> dict:
    """Emulate every rank; return per rank the actions with what each one really computes.

    Forwards: ``("F", stage, unit n, chunk index used)``; backwards: ``("B", stage, unit whose
    graph is run, unit whose gradient is fed)``. Stages are in loop placement (c·p + r).
    """
    n_stages = p * v
    seqs = {r: official_iterations(p, r, v, m, k) for r in range(p)}
    grads_from_below: dict[int, list[int]] = {}  # stage -> units of its backwards, in order
    actions: dict[int, list[tuple]] = {r: [] for r in range(p)}
    # A stage's gradients come from the stage after it, so emulate stages last to first.
    for stage in reversed(range(n_stages)):
        c, r = divmod(stage, p)
        outputs, grads = _SpQueue(k), _SpQueue(k)
        incoming = grads_from_below.get(stage + 1)
        n_fwd = n_bwd = 0
        done = []
        for t, i, chunk in seqs[r]:
            if chunk != c:
                continue
            if t == "F":
                outputs.append(n_fwd)
                done.append(("F", stage, n_fwd, i % k))
                n_fwd += 1
            else:
                # the gradient for this backward was received just before it (one message each)
                grads.append(incoming[n_bwd] if incoming is not None else None)
                unit = outputs.pop()
                grad_unit = grads.pop()
                done.append(("B", stage, unit, unit if grad_unit is None else grad_unit))
                n_bwd += 1
        grads_from_below[stage] = [u for a, _, u, _ in done if a == "B"]
        for a in done:
            actions[r].append(a)
    # restore each rank's own order (the loop above grouped actions by stage)
    ordered = {}
    for r, seq in seqs.items():
        per_stage = {}
        for a in actions[r]:
            per_stage.setdefault((a[0], a[1]), []).append(a)
        ordered[r] = [per_stage[(t, chunk * p + r)].pop(0) for t, _, chunk in seq]
    return ordered


def positional_deadlock_free(run: dict, n_stages: int) -> bool:
    """Play the ranks against each other: the n-th forward of a stage waits for the n-th
    forward of the stage before it, the b-th backward for the b-th backward after it."""
    orders = {}
    for r, acts in run.items():
        count: dict[tuple[str, int], int] = {}
        orders[r] = []
        for t, s, *_ in acts:
            n = count.get((t, s), 0)
            count[(t, s)] = n + 1
            orders[r].append((t, s, n))
    pos, done = dict.fromkeys(orders, 0), set()
    while any(pos[r] < len(orders[r]) for r in orders):
        ready = []
        for r, ops in orders.items():
            if pos[r] < len(ops):
                t, s, n = ops[pos[r]]
                if (t == "F" and (s == 0 or ("F", s - 1, n) in done)) or (
                    t == "B" and (s == n_stages - 1 or ("B", s + 1, n) in done)
                ):
                    ready.append(r)
        if not ready:
            return False
        for r in ready:
            done.add(orders[r][pos[r]])
            pos[r] += 1
    return True


def wrong_chunks(run: dict, m: int, k: int) -> list[tuple]:
    """Every action that computes something other than what a whole-sequence run computes."""
    bad = []
    for acts in run.values():
        by_stage: dict[int, list[int]] = {}
        for a in acts:
            t, s, unit, x = a
            if t == "F" and x != unit % k:
                bad.append(a)  # the forward of unit n runs as chunk x: wrong positions and K/V prefix
            if t == "B":
                if x != unit:
                    bad.append(a)  # fed another unit's gradient
                by_stage.setdefault(s, []).append(unit)
        bad += [("order", s, units) for s, units in by_stage.items() if units != backward_unit_order(m, k)]
    return bad


def _ours(p: int, v: int, m: int, k: int) -> dict:
    return schedule_ir_multi.interleaved_orders(p, v, m, k)


def _official_as_ops(run: dict) -> dict:
    return {r: [(t, s, u) for t, s, u, _ in acts] for r, acts in run.items()}


# k divides p, m a multiple of p and m > p: the official order is exact and equals ours.
@pytest.mark.parametrize("p,v,m,k", [(2, 2, 4, 2), (4, 2, 8, 2), (4, 2, 8, 4), (4, 3, 8, 2), (2, 2, 6, 1),
                                     (4, 2, 12, 4), (8, 2, 16, 4)])
def test_k_divides_p_m_above_p_equals_ours(p, v, m, k):
    run = official_run(p, v, m, k)
    assert positional_deadlock_free(run, p * v)
    assert wrong_chunks(run, m, k) == []
    assert _official_as_ops(run) == _ours(p, v, m, k)


# m == p: the official code runs every forward first (Megatron's all-warm-up case). Exact,
# but not our order: ours keeps the 1F1B warm-up, so it holds fewer units.
@pytest.mark.parametrize("p,v,k", [(2, 2, 2), (4, 2, 2), (4, 2, 4), (4, 3, 2)])
def test_m_equals_p_official_runs_all_forwards_first(p, v, k):
    m = p
    run = official_run(p, v, m, k)
    assert positional_deadlock_free(run, p * v)
    assert wrong_chunks(run, m, k) == []
    for acts in run.values():
        kinds = [a[0] for a in acts]
        assert kinds == ["F"] * (m * v * k) + ["B"] * (m * v * k)
    ours = _ours(p, v, m, k)
    assert _official_as_ops(run) != ours
    peak = lambda ops: schedule_ir_multi.peak_live_units_multi(ops)  # noqa: E731
    assert max(peak(o) for o in ours.values()) < max(peak(o) for o in _official_as_ops(run).values())


# k does not divide p (or k > p): the official loop still runs to the end (no deadlock, no
# empty queue), but some units run as the wrong chunk: it trains silently on wrong chunks.
@pytest.mark.parametrize("p,v,m,k", [(4, 2, 8, 3), (4, 2, 4, 3), (2, 2, 2, 3), (2, 2, 4, 3), (3, 2, 6, 2),
                                     (3, 2, 3, 2), (4, 2, 8, 8), (2, 2, 4, 4)])
def test_k_not_dividing_p_runs_on_wrong_chunks(p, v, m, k):
    assert p % k
    run = official_run(p, v, m, k)  # raises IndexError if the official loop would crash
    assert positional_deadlock_free(run, p * v)
    bad = wrong_chunks(run, m, k)
    assert bad, "expected the official order to compute some unit as the wrong chunk"
    assert any(t == "F" for t, *_ in bad)  # at least one forward uses another chunk's index
    n_fwd = sum(1 for t, *_ in bad if t == "F")
    assert 2 * n_fwd >= p * v * m * k  # half or more of all forwards (design §9)
    if m > p:  # and the backward side too: out of LIFO order, or another unit's gradient
        assert any(t in ("B", "order") for t, *_ in bad)
    # ours runs the same (p, v, m, k) exactly wherever it accepts it
    ours = _ours(p, v, m, k)
    schedule_ir_multi.check_stage_orders(ours, p * v, m, k)
    schedule_ir_multi.check_deadlock_free(ours, p * v)


def test_design_figures():
    """The numbers design §9 quotes."""
    pk = schedule_ir_multi.peak_live_units_multi
    assert pk(_ours(4, 2, 4, 4)[0]) == 14
    assert pk(_official_as_ops(official_run(4, 2, 4, 4))[0]) == 32
    bad = wrong_chunks(official_run(4, 2, 8, 3), 8, 3)
    assert sum(1 for t, *_ in bad if t == "F") == 128 and 4 * 2 * 8 * 3 == 192


def test_official_refuses_m_not_a_multiple_of_p():
    with pytest.raises(ValueError, match="m % p"):
        official_iterations(4, 0, 2, 6, 2)


def test_emulation_catches_a_wrong_order():
    """The checks can fail: a run whose forward uses chunk 0 twice is flagged."""
    run = official_run(2, 2, 4, 2)
    t, s, u, _ = run[0][1]
    run[0][1] = (t, s, u, 0 if u % 2 else 1)
    assert wrong_chunks(run, 4, 2)
