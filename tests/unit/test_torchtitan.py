"""The torchtitan seam, checked against a stand-in module with torchtitan's call pattern."""

import sys
import types
from unittest import mock

import pytest
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, Schedule1F1B

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage
from pipelining_seq.integrations import torchtitan as tt


def fake_stage(num_stages=2):
    stage = mock.create_autospec(SequencePipelineStage, instance=True)
    stage.num_stages, stage.stage_index = num_stages, 0
    return stage


def test_bound_class_builds_with_torchtitans_arguments():
    cls = tt.seq1f1b_schedule_class(n_seq_chunks=4, seq_partition=[5, 4, 4, 3])
    assert issubclass(cls, PipelineScheduleSingle) and issubclass(cls, ScheduleSeq1F1B)
    sched = cls(fake_stage(), n_microbatches=2, loss_fn=lambda o, t: o.sum(), scale_grads=False)
    assert sched.n_seq_chunks == 4 and sched.n_microbatches == 2
    assert sched.loss_reduction == "sum"  # torchtitan's sum / global_tokens loss


def test_patch_resolves_seq1f1b_and_delegates():
    fake = types.ModuleType("fake_titan_pp")
    fake.get_schedule_class = lambda name: "original"
    sys.modules["fake_titan_pp"] = fake
    try:
        with tt.patch_schedule_lookup(module="fake_titan_pp", n_seq_chunks=2):
            assert issubclass(fake.get_schedule_class("seq1f1b"), ScheduleSeq1F1B)
            assert fake.get_schedule_class("1F1B") is Schedule1F1B
        assert fake.get_schedule_class("Seq1F1B") == "original"
    finally:
        del sys.modules["fake_titan_pp"]


def test_missing_chunks_is_a_clear_error():
    with pytest.raises(ValueError, match="n_seq_chunks"):
        tt.get_schedule_class("Seq1F1B")
