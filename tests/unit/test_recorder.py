"""What ScheduleSeq1F1B's executor actually runs equals the schedule IR, on every rank.

The executor (``_run_1f1b``) derives its warm-up and backward order itself; the
simulator, planner and memory figures read :func:`schedule_ir.compute_order`. A stage
that records its forwards and backwards (and has no peers to talk to) catches any drift.
"""

from __future__ import annotations

import pytest

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage, schedule_ir


class _RecordingStage(SequencePipelineStage):
    """Only what the executor touches: no module, no process group, no communication."""

    def __init__(self, stage_index: int, num_stages: int) -> None:  # no super().__init__: nothing real is built
        self.stage_index, self.num_stages = stage_index, num_stages
        self.has_backward = True
        self.ran: list[tuple[str, int]] = []

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        self.ran.append(("F", fwd_chunk_id))

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        self.ran.append(("B", bwd_chunk_id))

    def get_fwd_recv_ops(self, fwd_chunk_id):
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops


CASES = [(p, m, k) for p in (2, 3, 4, 8) for m in range(1, 7) for k in range(1, 7) if m * k >= p]


@pytest.mark.parametrize("early_recv", [False, True])
@pytest.mark.parametrize(("p", "m", "k"), CASES, ids=lambda v: str(v))
def test_executor_runs_exactly_the_ir(p, m, k, early_recv):
    for r in range(p):
        stage = _RecordingStage(r, p)
        sched = ScheduleSeq1F1B(stage, m, None, n_seq_chunks=k, early_recv=early_recv)
        n = m * k
        sched._run_1f1b([()] * n, [{}] * n, None, False, None)
        assert stage.ran == schedule_ir.compute_order(p, r, m, k), (p, r, m, k)
