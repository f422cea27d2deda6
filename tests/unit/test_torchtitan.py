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


def test_sequence_parallel_buffers_hold_the_shard():
    """Under TP + sequence parallelism a stage receives chunk_length / tp tokens, not the chunk."""
    import torch

    from pipelining_seq import _compat
    from pipelining_seq.integrations.torchtitan.stages import SeqShardedPipelineStage, stage_class

    assert stage_class(1) is SequencePipelineStage
    cls = stage_class(2)
    assert issubclass(cls, SeqShardedPipelineStage) and cls.seq_shards == 2
    stage = object.__new__(cls)  # only the buffer sizing is exercised: no process group
    stage.activation_seq_dim, stage._n_chunks, stage._lengths = 1, 2, [40, 24]
    info = object.__new__(_compat.RecvInfo)  # its constructor differs between torch releases
    info.buffer = torch.empty(1, 20, 8, requires_grad=True)
    infos = [info]
    stage._fit_buffers(infos, 1)
    assert infos[0].buffer.shape == (1, 12, 8) and infos[0].buffer.requires_grad
    stage._fit_buffers(infos, 2)  # micro-batch 1, chunk 0
    assert infos[0].buffer.shape == (1, 20, 8)
    stage._lengths = [41, 23]
    with pytest.raises(ValueError, match="tensor_parallel_degree"):
        stage._fit_buffers(infos, 0)


def test_zero_bubble_looks_single_stage_to_torchtitan():
    from pipelining_seq import ScheduleSeq1F1BZeroBubble

    cls = tt.get_schedule_class("seq1f1bzerobubble", n_seq_chunks=2)
    assert issubclass(cls, PipelineScheduleSingle)  # torchtitan: one stage per rank
    assert issubclass(cls.built, ScheduleSeq1F1BZeroBubble)  # what constructing it returns
    with pytest.raises(ValueError, match="graph pipeline"):
        cls.built(fake_stage(), n_microbatches=2, backward_requires_autograd=False)


def test_unknown_name_lists_every_schedule():
    with pytest.raises(ValueError, match="Seq1F1B, InterleavedSeq1F1B, Seq1F1BZeroBubble, 1F1B"):
        tt.get_schedule_class("Seq1F1B-I")
