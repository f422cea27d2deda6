"""Seq1F1B-I and Seq1F1B-ZB orders as data: torch's validators and deadlock simulation,
Seq1F1B's same-stage dependencies, the official order where it is valid, memory bounds."""

import contextlib
import io

import pytest

from pipelining_seq import _compat, recv_order, schedule_ir, schedule_ir_multi

MK = [(m, k) for m in range(1, 9) for k in range(1, 9)]


def _fresh(actions):
    """New per-rank lists for torch's helpers to edit; the actions are immutable tuples (no deep copy)."""
    return {r: list(ops) for r, ops in actions.items()}


def _torch_checks(actions, p, n_stages, n_units):
    stage_to_rank = lambda s: s % p  # noqa: E731 - loop placement
    _compat.validate_schedule(_fresh(actions), p, n_stages, n_units)
    with_comms = _compat.add_send_recv(_fresh(actions), stage_to_rank=stage_to_rank, num_stages=n_stages)
    early = recv_order.post_receives_early(with_comms, stage_to_rank)
    with contextlib.redirect_stdout(io.StringIO()):
        _compat.simulate_comms_compute(with_comms, stage_to_rank, n_stages)
        _compat.simulate_comms_compute(_fresh(early), stage_to_rank, n_stages)
    _check_early_receives(with_comms, early, stage_to_rank)


def _check_early_receives(lowered, early, stage_to_rank):
    # Same actions; compute and sends in the same order; receives from one peer in the
    # same order; no receive later than torch placed it.
    def peer(a):
        return recv_order.recv_peer(a, stage_to_rank)

    for r, actions in lowered.items():
        moved = early[r]
        assert sorted(map(str, actions)) == sorted(map(str, moved))
        assert [a for a in actions if peer(a) is None] == [a for a in moved if peer(a) is None]
        for q in {peer(a) for a in actions} - {None}:
            assert [a for a in actions if peer(a) == q] == [a for a in moved if peer(a) == q]
        pos = {}
        others = 0
        for a in moved:
            if peer(a) is None:
                others += 1
            else:
                pos[str(a)] = others
        others = 0
        for a in actions:
            if peer(a) is None:
                others += 1
            else:
                assert pos[str(a)] <= others, (r, str(a))


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_matrix(p, v):
    accepted = 0
    for m, k in MK:
        if m * k < p:
            continue
        try:
            orders = schedule_ir_multi.interleaved_orders(p, v, m, k)
        except ValueError as e:
            assert "multiple of the number of rounds" in str(e)
            continue
        accepted += 1
        schedule_ir_multi.check_stage_orders(orders, p * v, m, k)
        schedule_ir_multi.check_deadlock_free(orders, p * v)
        _torch_checks(schedule_ir_multi.to_actions(orders), p, p * v, m * k)
        for r, ops in orders.items():
            assert {s for _, s, _ in ops} == set(range(r, p * v, p))
    assert accepted >= 30


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_zero_bubble_matrix(p):
    for m, k in MK:
        if m * k < p:
            continue
        orders = schedule_ir_multi.zero_bubble_orders(p, m, k)
        schedule_ir_multi.check_stage_orders(orders, p, m, k)
        schedule_ir_multi.check_deadlock_free(orders, p)
        _torch_checks(schedule_ir_multi.to_actions(orders), p, p, m * k)
        for ops in orders.values():
            # H1 memory: no rank above Seq1F1B's rank-0 peak (p + k - 1 units).
            seq1f1b_rank0 = schedule_ir.peak_live_units(schedule_ir.compute_order(p, 0, m, k))
            assert schedule_ir_multi.peak_live_units_multi(ops) <= seq1f1b_rank0
            assert [t for t, _, _ in ops].count("W") == m * k


@pytest.mark.parametrize("p,m,k", [(4, 4, 2), (8, 4, 4), (4, 8, 4), (4, 2, 2), (2, 4, 2), (8, 2, 8)])
def test_interleaved_matches_official_order_when_k_divides_p(p, m, k):
    """The official warm-up (v-1)p + 2(p-r-1) + (k-1) and switch every p units (the loop itself: test_official_interleaved)."""
    v = 2
    assert schedule_ir_multi.interleaved_group_size(p, m, k) == p
    for r, ops in schedule_ir_multi.interleaved_orders(p, v, m, k).items():
        warm = min((v - 1) * p + 2 * (p - r - 1) + (k - 1), v * m * k)
        assert all(t == "F" for t, _, _ in ops[:warm]) and ops[warm + 1][0] == "B"
        fwd_stages = [s for t, s, _ in ops if t == "F"]
        assert fwd_stages == [((u % (p * v)) // p) * p + r for u in range(v * m * k)]


def _official_group_order(p, v, m, k):
    """The official grouping (switch every p units) with backwards labelled LIFO by unit, for any k."""
    bwd_units = schedule_ir.backward_unit_order(m, k)
    orders = {}
    for r in range(p):
        total = v * m * k
        warm = min((v - 1) * p + 2 * (p - r - 1) + (k - 1), total)
        fn, bn, ops = [0] * v, [0] * v, []
        seq = ["F"] * warm + ["F", "B"] * (total - warm) + ["B"] * warm
        fi = bi = 0
        for t in seq:
            if t == "F":
                loc = (fi // p) % v
                ops.append(("F", loc * p + r, fn[loc]))
                fn[loc] += 1
                fi += 1
            else:
                loc = v - 1 - (bi // p) % v
                ops.append(("B", loc * p + r, bwd_units[bn[loc]]))
                bn[loc] += 1
                bi += 1
        orders[r] = ops
    return orders


@pytest.mark.parametrize("p,m,k", [(4, 4, 3), (2, 2, 3), (4, 4, 8)])
def test_official_grouping_fails_where_k_does_not_divide_p(p, m, k):
    """Groups of p units cannot run with LIFO-labelled units; ours can (the official loop runs, on wrong chunks)."""
    with pytest.raises(ValueError):
        bad = _official_group_order(p, 2, m, k)
        schedule_ir_multi.check_stage_orders(bad, 2 * p, m, k)
        schedule_ir_multi.check_deadlock_free(bad, 2 * p)
    good = schedule_ir_multi.interleaved_orders(p, 2, m, k)
    schedule_ir_multi.check_deadlock_free(good, 2 * p)


def test_chunk_comes_from_the_unit():
    """Every stage forwards units 0..m*k-1 in order, so unit u runs chunk u % k."""
    p, v, m, k = 4, 2, 4, 3
    orders = schedule_ir_multi.interleaved_orders(p, v, m, k)
    for s in range(p * v):
        fwd = [u for ops in orders.values() for t, st, u in ops if t == "F" and st == s]
        assert fwd == list(range(m * k))


def test_zero_bubble_defers_weight_passes_per_rank():
    orders = schedule_ir_multi.zero_bubble_orders(4, 2, 2)
    for r, ops in orders.items():
        first_w = next(i for i, (t, _, _) in enumerate(ops) if t == "W")
        n_i_before = sum(1 for t, _, _ in ops[:first_w] if t == "I")
        assert n_i_before == r + 1
        ws = [u for t, _, u in ops if t == "W"]
        assert ws == [u for t, _, u in ops if t == "I"]  # W follows I order (LIFO on stage 0)


def test_check_stage_orders_catches_bad_orders():
    ok = [("F", 0, 0), ("F", 0, 1), ("I", 0, 1), ("I", 0, 0), ("W", 0, 1), ("W", 0, 0)]
    schedule_ir_multi.check_stage_orders({0: ok}, 1, 1, 2)
    w_fifo = ok[:4] + [("W", 0, 0), ("W", 0, 1)]  # stage 0 runs the relay in W: must be LIFO
    with pytest.raises(ValueError, match="LIFO"):
        schedule_ir_multi.check_stage_orders({0: w_fifo}, 1, 1, 2)
    i_fifo = [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("B", 0, 1)]
    with pytest.raises(ValueError, match="LIFO"):
        schedule_ir_multi.check_stage_orders({0: i_fifo}, 1, 1, 2)
    with pytest.raises(ValueError, match="deadlocks"):
        schedule_ir_multi.check_deadlock_free({0: [("B", 0, 0)], 1: [("F", 1, 0)]}, 2)


def test_interleaved_rounds_error():
    with pytest.raises(ValueError, match="n_microbatches=7 must be a multiple"):
        schedule_ir_multi.interleaved_group_size(8, 7, 3)
