"""Seq1F1B action lists checked as data: torch's validator and comms simulator, invariants,
and equality with Schedule1F1B's executed order at k=1. No process group needed."""

from unittest import mock

import pytest
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B

from pipelining_seq import _compat, schedule_ir
from pipelining_seq.schedule_ir import (
    backward_unit_order,
    check_order,
    compute_order,
    peak_live_units,
    pipeline_order,
)

CASES = [(p, m, k) for p in (2, 3, 4, 8) for m in range(1, 9) for k in range(1, 9) if m * k >= p]


def compute_only(order):
    return {r: [a for a in acts if a is not None and a.computation_type in (_compat.FORWARD, _compat.FULL_BACKWARD)]
            for r, acts in order.items()}


@pytest.mark.parametrize("p,m,k", CASES)
def test_validator_and_comms_simulator(p, m, k):
    order = pipeline_order(p, m, k)
    _compat.validate_schedule(order, p, p, m * k)
    compute = compute_only(order)
    with_comms = _compat.add_send_recv(compute, stage_to_rank=lambda s: s, num_stages=p)
    _compat.simulate_comms_compute(with_comms, stage_to_rank=lambda s: s, num_stages=p)


@pytest.mark.parametrize("p,m,k", CASES)
def test_seq1f1b_invariants(p, m, k):
    n = m * k
    for r in range(p):
        ops = compute_order(p, r, m, k)
        fwd = [u for t, u in ops if t == "F"]
        bwd = [u for t, u in ops if t == "B"]
        check_order(ops, m, k)
        assert fwd == list(range(n))
        assert bwd == backward_unit_order(m, k)
        # Backward of (mb, j+1) before (mb, j); micro-batches FIFO.
        pos = {u: i for i, u in enumerate(bwd)}
        for u in range(n):
            mb, j = divmod(u, k)
            if j + 1 < k:
                assert pos[u + 1] < pos[u]
            if mb + 1 < m:
                assert pos[u] < pos[(mb + 1) * k + j]
        # Each unit's forward precedes its backward on the stage.
        seen = set()
        for t, u in ops:
            if t == "F":
                seen.add(u)
            else:
                assert u in seen
        warm = schedule_ir.warmup_units(p, r, m, k)
        assert warm == min(p - r - 1 + k - 1, n)
        assert all(t == "F" for t, _ in ops[:warm])
        assert peak_live_units(ops) == min(p - r + k - 1, n)


def record_torch_1f1b(p, m, r):
    """The order Schedule1F1B actually executes on stage r (fake stage, no comms)."""
    calls = []
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.num_stages, stage.stage_index, stage.is_last = p, r, r == p - 1
    stage.forward_one_chunk.side_effect = lambda i, *a, **kw: calls.append(("F", i))
    stage.backward_one_chunk.side_effect = lambda i, *a, **kw: calls.append(("B", i))
    for name in ("get_fwd_recv_ops", "get_fwd_send_ops", "get_bwd_recv_ops", "get_bwd_send_ops"):
        getattr(stage, name).return_value = []
    sched = Schedule1F1B(stage, m)
    sched._initialize_stage = lambda *a, **kw: None
    sched._step_microbatches()
    return calls


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [8, 9])
def test_k1_equals_schedule_1f1b(p, m):
    for r in range(p):
        assert compute_order(p, r, m, 1) == record_torch_1f1b(p, m, r)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_k1_ir_equals_torch_ir_except_last_rank(p):
    # torch's Schedule1F1B._get_pipeline_order numbers the last rank's forwards from 1
    # (an off-by-one that its own runtime never uses); every other rank matches exactly.
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.num_stages, stage.stage_index = p, 0
    torch_ir = Schedule1F1B(stage, 8)._get_pipeline_order()
    ours = pipeline_order(p, 8, 1)
    for r in range(p - 1):
        assert ours[r] == torch_ir[r]


@pytest.mark.parametrize("bad", [
    [("F", 0), ("F", 1), ("B", 0), ("B", 1)],  # chunks FIFO
    [("F", 1), ("F", 0), ("B", 1), ("B", 0)],  # forwards out of order
    [("F", 0), ("B", 1), ("F", 1), ("B", 0)],  # backward before forward
    [("F", 0), ("F", 1), ("B", 1)],  # missing backward
])
def test_check_order_rejects_wrong_orders(bad):
    with pytest.raises(ValueError):
        check_order(bad, 1, 2)
