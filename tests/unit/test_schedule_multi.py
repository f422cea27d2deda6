"""Seq1F1B-I and Seq1F1B-ZB on one rank (in-process gloo): parity, losses, and bad input
refused before any communication. Multi-rank parity is in test_parity_multi.py."""

import pytest
import torch
from torch.distributed.pipelining import PipelineStage

from pipelining_seq import ScheduleInterleavedSeq1F1B, ScheduleSeq1F1BZeroBubble, SequencePipelineStage, _compat
from pipelining_seq.models import split_stage
from tests.workers.parity_multi_worker import _record
from tests.workers.parity_worker import ce_loss, make_batch, make_model, reference

pytestmark = pytest.mark.usefixtures("world_of_one")

CPU = torch.device("cpu")


def _stages(indices, n_stages, model=None):
    model = model or make_model()
    return [SequencePipelineStage(split_stage(model, s, n_stages), s, n_stages, CPU) for s in indices]


def _check_parity(model_parts, sched, m, batch=4, seq=16):
    x, y = make_batch(batch, seq)
    losses: list = []
    out = sched.step(x, target=y, losses=losses)
    ref_losses, ref_grads = reference({}, batch, seq, m)
    torch.testing.assert_close(out, make_model()(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.stack(losses), ref_losses, rtol=0, atol=1e-12)
    for part in model_parts:
        for n, p in part.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=0, atol=1e-12)


def test_zero_bubble_one_rank():
    (stage,) = _stages([0], 1)
    sched = ScheduleSeq1F1BZeroBubble(stage, 2, ce_loss, n_seq_chunks=3, seq_partition=[7, 5, 4])
    log: list = []
    _record(stage, log)
    _check_parity([stage.submod], sched, 2)
    assert log == sched.compute_orders[0]  # what the runtime ran is the IR
    evals: list = []
    x, y = make_batch(4, 16)
    out = sched.eval(x, target=y, losses=evals)
    torch.testing.assert_close(out, make_model()(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.stack(evals), reference({}, 4, 16, 2)[0], rtol=0, atol=1e-12)
    assert len(stage.kv_cache) == 0
    assert len(stage.kv_cache) == 0 and sched.chunk_lengths == [7, 5, 4]
    kinds = {a.computation_type for a in sched.pipeline_order[0]}
    assert kinds == {torch.distributed.pipelining.schedules._ComputationType.FORWARD,
                     torch.distributed.pipelining.schedules._ComputationType.BACKWARD_INPUT,
                     torch.distributed.pipelining.schedules._ComputationType.BACKWARD_WEIGHT}


@pytest.mark.skipif(_compat.TORCH_VERSION < (2, 13), reason="torch 2.11's action runtime sends to its own rank "
                    "when one rank holds both stages (gloo refuses); real pipelines have 2+ ranks")
def test_interleaved_one_rank_two_stages():
    stages = _stages([0, 1], 2)
    sched = ScheduleInterleavedSeq1F1B(stages, 2, ce_loss, n_seq_chunks=2)
    log: list = []
    for s in stages:
        _record(s, log)
    _check_parity([s.submod for s in stages], sched, 2)
    assert log == sched.compute_orders[0]


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: ScheduleSeq1F1BZeroBubble(_stages([0, 1], 2), 2, ce_loss, n_seq_chunks=2), "one stage per rank, got 2"),
        (lambda: ScheduleInterleavedSeq1F1B(_stages([0, 2], 4), 2, ce_loss, n_seq_chunks=2),
         r"rank 0 of 1 holds stages \[0, 2\], but the schedule needs \[0, 1, 2, 3\]"),
        (lambda: ScheduleSeq1F1BZeroBubble(_stages([0], 2)[0], 2, ce_loss, n_seq_chunks=2),
         "num_stages=2 but the pipeline has 1 ranks"),
        (lambda: ScheduleInterleavedSeq1F1B(_stages([0], 1), 0, ce_loss, n_seq_chunks=2), "n_microbatches=0"),
        (lambda: ScheduleInterleavedSeq1F1B(_stages([0, 1], 2)[0], 2, ce_loss, n_seq_chunks=2), "must be a list"),
    ],
)
def test_constructor_errors(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def _pretend_ranks(stages, p, rank=0):
    for s in stages:
        s.group_size, s.group_rank = p, rank
    return stages


def test_too_few_units_and_bad_rounds():
    stages = _pretend_ranks(_stages([0, 4], 8, make_model(n_layers=8)), 4)
    with pytest.raises(ValueError, match=r"= 2 units cannot fill 4 pipeline ranks"):
        ScheduleInterleavedSeq1F1B(stages, 1, ce_loss, n_seq_chunks=2)
    stages = _pretend_ranks(_stages([0], 4), 4)
    with pytest.raises(ValueError, match=r"= 3 units cannot fill"):
        ScheduleSeq1F1BZeroBubble(stages, 3, ce_loss, n_seq_chunks=1)
    stages = _pretend_ranks(_stages([0, 8], 16, make_model(n_layers=16)), 8)
    with pytest.raises(ValueError, match="n_microbatches=7 must be a multiple"):
        ScheduleInterleavedSeq1F1B(stages, 7, ce_loss, n_seq_chunks=3)


def test_plain_stage_needs_k1():
    model = make_model()
    with pytest.raises(TypeError, match="SequencePipelineStage"):
        ScheduleSeq1F1BZeroBubble(PipelineStage(model, 0, 1, CPU), 2, ce_loss, n_seq_chunks=2)
    parts = [split_stage(model, s, 2) for s in range(2)]
    with pytest.raises(TypeError, match="SequencePipelineStage"):
        ScheduleInterleavedSeq1F1B([PipelineStage(p, s, 2, CPU) for s, p in enumerate(parts)], 2, ce_loss,
                                   n_seq_chunks=2)
    ScheduleSeq1F1BZeroBubble(PipelineStage(model, 0, 1, CPU), 2, ce_loss, n_seq_chunks=1)
