"""Checkpoints reshard: saved on pp2 x dp2, resumed on pp2 x dp1 and pp2 x tp2 (the losses
continue within float tolerance), and resumed bit for bit on the same layout."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from pipelining_seq.tools.testing import run_ranks
from pipelining_seq.trainer import checkpoint as ckpt
from tests.workers.train_workers import schedules_worker

pytestmark = pytest.mark.slow

# Global batch 8 in every layout: 4 per FSDP rank with dp2, 8 otherwise.
DP2 = ["parallelism.data_parallel_shard_degree=2", "training.local_batch_size=4"]
DP1 = ["training.local_batch_size=8"]
TP2 = ["parallelism.tensor_parallel_degree=2", "training.local_batch_size=8"]
COMMON = ["training.steps=6", "checkpoint.interval=3", "lr_scheduler.warmup_steps=2"]


def _losses(records: list[dict]) -> list[float]:
    with_loss = [r["losses"] for r in records if r["losses"]]
    assert with_loss and all(x == with_loss[0] for x in with_loss)  # the last stage's ranks agree
    return with_loss[0]


def _shards(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(ckpt.read_manifest(path, verify="sha256")["files"]):
        for key, value in load_file(os.path.join(path, name)).items():
            out[f"{name}:{key}"] = value
    return out


def test_save_on_dp2_resume_on_dp1_tp2_and_bit_for_bit_on_dp2(tmp_path):
    straight, again = str(tmp_path / "straight"), str(tmp_path / "again")
    rec = run_ranks(schedules_worker, 4, {"run": [*DP2, *COMMON, "checkpoint.enable=true"]}, straight, timeout_s=300)
    full = _losses([r["run"] for r in rec])
    assert len(full) == 6
    step3 = ckpt.step_dir(os.path.join(straight, "checkpoint"), 3)
    manifest = ckpt.read_manifest(step3, verify="sha256")
    assert len(manifest["files"]) == 4  # every rank wrote its own shard

    load = [f"checkpoint.load={step3}", "checkpoint.enable=false"]
    runs = {"dp1": [*DP1, *COMMON, *load]}
    rec = run_ranks(schedules_worker, 2, runs, str(tmp_path / "dp1"), timeout_s=300)
    dp1 = _losses([r["dp1"] for r in rec])
    assert [r["dp1"]["start_step"] for r in rec] == [3, 3]
    assert dp1 == pytest.approx(full[3:], rel=1e-4, abs=1e-5)

    runs = {"tp2": [*TP2, *COMMON, *load], "dp2": [*DP2, *COMMON, f"checkpoint.load={step3}", "checkpoint.enable=true"]}
    rec = run_ranks(schedules_worker, 4, runs, again, timeout_s=300)
    tp2 = _losses([r["tp2"] for r in rec])
    assert tp2 == pytest.approx(full[3:], rel=1e-4, abs=1e-5)
    # Negative control: the resumed losses are not just flat (steps 4..6 move).
    assert max(full[3:]) - min(full[3:]) > 1e-3

    # Same layout: weights and AdamW state of step 6 bit for bit, and the same losses.
    assert _losses([r["dp2"] for r in rec]) == full[3:]
    a = _shards(ckpt.step_dir(os.path.join(straight, "checkpoint"), 6))
    b = _shards(ckpt.step_dir(os.path.join(again, "checkpoint"), 6))
    assert a.keys() == b.keys() and any(":optim." in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
