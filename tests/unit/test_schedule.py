"""ScheduleSeq1F1B on a single rank (in-process gloo): outputs, loss conventions, bad input,
and the negative control for backward order. Multi-rank parity is in test_parity.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage, schedule_ir
from tests.workers.parity_worker import ce_loss, make_batch, make_model, reference

pytestmark = pytest.mark.usefixtures("world_of_one")


def build(m=2, k=2, loss=ce_loss, **kw):
    model = make_model()
    stage = SequencePipelineStage(model, 0, 1, torch.device("cpu"))
    return model, stage, ScheduleSeq1F1B(stage, m, loss, n_seq_chunks=k, **kw)


def test_single_stage_outputs_losses_and_grads():
    model, stage, sched = build(m=2, k=3, seq_partition=[7, 5, 4])
    x, y = make_batch(4, 16)
    losses = []
    out = sched.step(x, target=y, losses=losses)
    ref_losses, ref_grads = reference({}, 4, 16, 2)
    ref_model = make_model()
    torch.testing.assert_close(out, ref_model(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.stack(losses), ref_losses, atol=1e-12, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-12, rtol=0)
    assert len(stage.kv_cache) == 0 and sched.chunk_lengths == [7, 5, 4]


def test_sum_loss_with_scale_grads_false():
    def sum_loss(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")

    model, _, sched = build(m=2, k=4, loss=sum_loss, scale_grads=False, seq_partition=[6, 4, 3, 3])
    x, y = make_batch(4, 16)
    losses = []
    sched.step(x, target=y, losses=losses)
    ref = make_model()
    total = sum_loss(ref(x), y)
    total.backward()
    assert abs(torch.stack(losses).sum() - total.detach()) < 1e-9
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=0, msg=lambda m, name=n: f"{name}: {m}")


def test_presplit_step_form():
    model, _, sched = build(m=2, k=2)
    x, y = make_batch(4, 16)
    losses = []
    sched.step(arg_mbs=[(xs,) for xs in x.chunk(2)], target_mbs=list(y.chunk(2)), losses=losses)
    ref_losses, ref_grads = reference({}, 4, 16, 2)
    torch.testing.assert_close(torch.stack(losses), ref_losses, atol=1e-12, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-12, rtol=0)


def test_torchtitan_step_call():
    # torchtitan 0.3: sum / global tokens loss, scale_grads=False, pre-split step with loss_kwargs.
    def titan_loss(logits, target, global_valid_tokens):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / global_valid_tokens

    model, _, sched = build(m=2, k=4, loss=titan_loss, scale_grads=False, seq_partition=[6, 4, 3, 3])
    x, y = make_batch(4, 16)
    losses = []
    sched.step(arg_mbs=[(xs,) for xs in x.chunk(2)], kwarg_mbs=[{}, {}], target_mbs=list(y.chunk(2)),
               losses=losses, loss_kwargs={"global_valid_tokens": y.numel()}, return_outputs=False)
    ref = make_model()
    total = titan_loss(ref(x), y, y.numel())
    total.backward()
    assert abs(torch.stack(losses).sum() - total.detach()) < 1e-12
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=lambda m, name=n: f"{name}: {m}")


class FifoChunks(ScheduleSeq1F1B):
    """A deliberately wrong schedule: chunks' backwards in forward order."""

    def _run_1f1b(self, *args):
        orig = schedule_ir.backward_unit_order
        schedule_ir.backward_unit_order = lambda m, k: list(range(m * k))
        try:
            super()._run_1f1b(*args)
        finally:
            schedule_ir.backward_unit_order = orig


def test_wrong_backward_order_is_caught():
    model = make_model()
    stage = SequencePipelineStage(model, 0, 1, torch.device("cpu"))
    sched = FifoChunks(stage, 2, ce_loss, n_seq_chunks=2)
    x, y = make_batch(2, 16)
    with pytest.raises(RuntimeError, match="out of order"):
        sched.step(x, target=y)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(m=1, k=2, num_stages=4), r"n_microbatches \(1\) \* n_seq_chunks \(2\) = 2 units cannot fill 4"),
        (dict(m=2, k=3, seq_partition=[4, 4, 4], seq_len=16), "sums to 12"),
        (dict(m=2, k=3, seq_partition=[8, 0, 8]), "zero-length"),
        (dict(m=2, k=2, seq_partition=[8, 4, 4]), "n_seq_chunks=2"),
        (dict(m=2, k=2, seq_partition="balanced"), "needs the FLOP model"),
        (dict(m=2, k=2, seq_partition="zigzag"), "use one of uniform, balanced, calibrated"),
        (dict(m=0, k=2), "n_microbatches=0"),
    ],
)
def test_constructor_errors(kw, match):
    num_stages = kw.pop("num_stages", 1)
    stage = SequencePipelineStage(make_model(), 0, 1, torch.device("cpu"))
    stage.num_stages = num_stages
    with pytest.raises(ValueError, match=match):
        ScheduleSeq1F1B(stage, kw.pop("m"), ce_loss, n_seq_chunks=kw.pop("k"), **kw)


def test_plain_stage_needs_k1():
    stage = PipelineStage(make_model(), 0, 1, torch.device("cpu"))
    with pytest.raises(TypeError, match="SequencePipelineStage"):
        ScheduleSeq1F1B(stage, 2, ce_loss, n_seq_chunks=2)
    ScheduleSeq1F1B(stage, 2, ce_loss, n_seq_chunks=1)


@pytest.mark.parametrize(
    "batch,seq,kw,match",
    [
        (3, 16, dict(m=2, k=2), "batch size 3 is not divisible by n_microbatches=2"),
        (2, 14, dict(m=2, k=4), r"divisible by n_seq_chunks \(4\).*such as 12 or 16"),
        (2, 3, dict(m=2, k=4), "lower n_seq_chunks"),
        (2, 12, dict(m=2, k=2, seq_partition=[8, 8]), "built for 16: pass inputs of that length"),
    ],
)
def test_step_errors_before_any_work(batch, seq, kw, match):
    model, stage, sched = build(kw.pop("m"), kw.pop("k"), **kw)
    x, y = make_batch(batch, seq)
    with pytest.raises(ValueError, match=match):
        sched.step(x, target=y)
    assert all(p.grad is None for p in model.parameters())


def test_chunking_config_and_balanced_partition_match_the_keywords():
    # chunking=ChunkingConfig(...) is the same setting as the keywords; "balanced" is
    # resolved by the core from the FlopModel it is given.
    from pipelining_seq import ChunkingConfig
    from pipelining_seq.flops import FlopModel

    fm = FlopModel(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=64)
    lengths = fm.balanced_partition(16, 3, multiple_of=2)
    x, y = make_batch(4, 16)
    runs = []
    for kw in (dict(n_seq_chunks=3, seq_partition=lengths),
               dict(chunking=ChunkingConfig(n_seq_chunks=3, seq_partition="balanced", flop_model=fm, multiple_of=2))):
        model = make_model()
        stage = SequencePipelineStage(model, 0, 1, torch.device("cpu"))
        sched = ScheduleSeq1F1B(stage, 2, ce_loss, **kw)
        losses = []
        sched.step(x, target=y, losses=losses)
        assert sched.chunk_lengths == lengths
        runs.append((torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    for n, g in runs[0][1].items():
        torch.testing.assert_close(g, runs[1][1][n], atol=0, rtol=0)
    with pytest.raises(ValueError, match="seq_dim given next to chunking="):
        ScheduleSeq1F1B(stage, 2, ce_loss, chunking=ChunkingConfig(n_seq_chunks=2), seq_dim=2)
