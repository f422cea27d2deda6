"""End-to-end training on 2 CPU ranks: the default recipe through the CLI, and every
schedule against a single-process reference of the same training loop."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys

import pytest
import torch

from pipelining_seq.tools.testing import run_ranks
from pipelining_seq.trainer.optim import clip_grad_norm_, lr_factor
from tests.workers.train_workers import DEFAULT_RECIPE, ROOT, reference_run, schedules_worker, tiny_config


def test_lr_factor_warmup_then_cosine_to_floor():
    f = [lr_factor(s, warmup_steps=10, total_steps=100, decay_type="cosine", min_lr_factor=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone decay after warm-up
    assert f[99] == pytest.approx(0.1)
    lin = lr_factor(54, warmup_steps=10, total_steps=100, decay_type="linear", min_lr_factor=0.0)
    assert lin == pytest.approx(0.5)


def test_clip_grad_norm_matches_torch_on_one_rank():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    ours = clip_grad_norm_(a, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(b, 0.5)
    torch.testing.assert_close(ours, ref)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.slow
def test_default_recipe_runs_on_two_ranks_and_loss_drops(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "pipelining_seq.cli", "run", "--nproc-per-node", "2", DEFAULT_RECIPE,
        "training.steps=30", "metrics.log_freq=10", f"job.dump_folder={out}", "checkpoint.enable=false",
        "profiling.enable_profiling=true", "profiling.profile_freq=10",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    first, last = map(float, re.search(r"\[rank1\] done: loss ([\d.]+) -> ([\d.]+)", log).groups())
    assert first == pytest.approx(5.55, abs=0.1)  # ~ln(256): an untrained byte model
    assert last < first - 1.0, log[-3000:]
    progress = [line for line in log.splitlines() if " step 10/30 " in line]
    assert len(progress) == 1 and "[rank1]" in progress[0]  # the last stage reports, once
    assert "peak MiB stage0" in progress[0] and "stage1" in progress[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "lr", "grad_norm", "throughput/tokens_per_s", "throughput/tflops_per_device",
            "memory/peak_MiB_stage0", "memory/peak_MiB_stage1"} <= tags
    losses = {e.step: e.value for e in acc.Scalars("loss/train")}
    assert sorted(losses) == [1, 10, 20, 30]
    assert losses[30] == pytest.approx(last, abs=1e-3)

    traces = {r: glob.glob(str(out / "profile_traces" / f"rank{r}*.pt.trace.json")) for r in (0, 1)}
    assert all(len(files) == 3 for files in traces.values()), traces  # windows ending at 10, 20, 30
    names = {r: {ev.get("name", "") for ev in json.load(open(files[0]))["traceEvents"]} for r, files in traces.items()}
    assert any(n.startswith("PP:0F") for n in names[0]) and any(n.startswith("PP:0B") for n in names[0])
    assert any(n.startswith("PP:1F") for n in names[1]) and any(n.startswith("PP:1B") for n in names[1])


SCHEDULES = {
    "Seq1F1B": [],
    "Seq1F1B-balanced": ["seq1f1b.partition=balanced", "seq1f1b.num_seq_chunks=3"],
    "Seq1F1B-list": ["seq1f1b.partition=[24,16,14,10]"],
    "1F1B": ["parallelism.pipeline_parallel_schedule=1F1B"],
    "GPipe": ["parallelism.pipeline_parallel_schedule=GPipe"],
    "Interleaved1F1B": ["parallelism.pipeline_parallel_schedule=Interleaved1F1B"],
    "ZBVZeroBubble": ["parallelism.pipeline_parallel_schedule=ZBVZeroBubble"],
    "InterleavedSeq1F1B": ["parallelism.pipeline_parallel_schedule=interleavedseq1f1b"],
    "Seq1F1BZeroBubble": ["parallelism.pipeline_parallel_schedule=Seq1F1BZeroBubble", "seq1f1b.partition=balanced"],
}


@pytest.mark.slow
def test_every_schedule_gives_the_reference_loss_curve(tmp_path):
    records = run_ranks(schedules_worker, 2, SCHEDULES, str(tmp_path), timeout_s=120)
    curves = {}
    for name in SCHEDULES:
        with_loss = [r[name] for r in records if r[name]["losses"]]
        assert len(with_loss) == 1, name  # exactly one rank (the last stage's) reports
        curves[name] = with_loss[0]
        # Every rank agrees on the global grad norm (all-reduced over the pipeline).
        assert records[0][name]["grad_norms"] == pytest.approx(records[1][name]["grad_norms"], rel=1e-6)
    ref_losses, ref_norms = reference_run(tiny_config(str(tmp_path)))
    assert ref_losses[-1] < ref_losses[0] - 0.1  # the loop learns, so the curve is a real check
    for name, rec in curves.items():
        assert rec["losses"] == pytest.approx(ref_losses, rel=1e-4, abs=1e-4), name
        assert rec["grad_norms"] == pytest.approx(ref_norms, rel=1e-3), name
    # Same recipe, same seed: Seq1F1B and 1F1B agree to float rounding.
    assert curves["Seq1F1B"]["losses"] == pytest.approx(curves["1F1B"]["losses"], rel=1e-5)
    # Negative control: another seed is far outside that tolerance.
    other, _ = reference_run(tiny_config(str(tmp_path), "training.seed=1"))
    assert max(abs(a - b) for a, b in zip(other, ref_losses)) > 1e-3
