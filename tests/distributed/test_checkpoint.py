"""Checkpoints: round trip, refusals, export, and kill-then-resume bit for bit on 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipelining_seq.models import GPT, init_weights, split_stage
from pipelining_seq.trainer import checkpoint as ckpt
from pipelining_seq.trainer import export
from pipelining_seq.trainer.config import ConfigError
from pipelining_seq.trainer.optim import build_optimizer, lr_factor
from pipelining_seq.trainer.validation import validate_config
from tests.workers.train_workers import DEFAULT_RECIPE, ROOT, TINY, tiny_config


def _stages(cfg, seed_grads: int | None = 0):
    """Both stages of a 2-stage layout in this process, after one AdamW step."""
    g = cfg.model
    with torch.device("meta"):
        full = GPT(g)
    parts, opts, scheds = [], [], []
    for s in range(2):
        part = split_stage(full, s, 2)
        part.to_empty(device="cpu")
        init_weights(part, seed=cfg.training.seed, n_layers=g.n_layers)
        opt, sched = build_optimizer(cfg, part)
        if seed_grads is not None:
            gen = torch.Generator().manual_seed(seed_grads + s)
            for p in part.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            sched.step()
        parts.append(part)
        opts.append(opt)
        scheds.append(sched)
    return parts, opts, scheds


def _save(cfg, step, stages):
    parts, opts, scheds = stages
    return ckpt.save_checkpoint(cfg=cfg, step=step, stage_ids=[0, 1], parts=parts, optimizers=opts, schedulers=scheds)


def test_round_trip_restores_weights_optimizer_and_schedule(tmp_path):
    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true")
    saved = _stages(cfg)
    path = _save(cfg, 7, saved)
    manifest = ckpt.read_manifest(path, verify="sha256")
    assert manifest["step"] == 7 and manifest["data"]["next_step"] == 8
    assert manifest["partition"]["chunk_lengths"] == [16, 16, 16, 16]
    assert len(manifest["files"]) == 1  # one process: one shard, both stages in it
    assert manifest["rng"]["0"]["cpu"]

    fresh = _stages(cfg, seed_grads=None)
    step = ckpt.load_checkpoint(path, cfg=cfg, stage_ids=[0, 1], parts=fresh[0], optimizers=fresh[1], schedulers=fresh[2])
    assert step == 7
    for a, b in zip(saved[0], fresh[0]):
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb and torch.equal(pa, pb)
    for oa, ob in zip(saved[1], fresh[1]):
        sa, sb = oa.state_dict(), ob.state_dict()
        # torch's set_optimizer_state_dict hands betas back as a list; lr is the schedule's (below)
        strip = lambda groups: [{k: v for k, v in g.items() if k != "lr"} for g in json.loads(json.dumps(groups))]  # noqa: E731
        assert strip(sa["param_groups"]) == strip(sb["param_groups"])
        for i in sa["state"]:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(sa["state"][i][key], sb["state"][i][key])
    # The LR schedule is put at the checkpoint's step (a function of the step and the recipe).
    want = cfg.optimizer.lr * lr_factor(
        7, warmup_steps=cfg.lr_scheduler.warmup_steps, total_steps=cfg.training.steps,
        decay_type=cfg.lr_scheduler.decay_type, min_lr_factor=cfg.lr_scheduler.min_lr_factor,
    )
    assert [s.last_epoch for s in fresh[2]] == [7, 7]
    assert all(g["lr"] == want for o in fresh[1] for g in o.param_groups)


def test_export_merges_stages_into_a_loadable_gpt(tmp_path):
    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true")
    parts, opts, scheds = _stages(cfg)
    _save(cfg, 3, (parts, opts, scheds))
    out = str(tmp_path / "model.safetensors")
    export.export(str(tmp_path / "checkpoint"), out)  # the folder: its newest checkpoint
    model = export.load_exported(out)
    plain = GPT(cfg.model)
    plain.load_state_dict(load_file(out))  # the documented plain-torch way works too
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.equal(model(x), parts[1](parts[0](x)))
        assert torch.equal(plain(x), model(x))


def test_incomplete_other_model_other_layout_and_corrupt_are_refused(tmp_path):
    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true")
    stages = _stages(cfg)
    good = _save(cfg, 3, stages)
    bad = _save(cfg, 6, stages)
    os.remove(os.path.join(bad, ckpt.MANIFEST))  # a save that died before its manifest

    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.read_manifest(bad)
    with pytest.raises(ConfigError, match=r"checkpoint\.load.*incomplete"):
        validate_config(tiny_config(str(tmp_path), "checkpoint.enable=true", f"checkpoint.load={bad}"))
    assert ckpt.resolve_load(tiny_config(str(tmp_path), "checkpoint.load=latest")) == good  # skips it

    with pytest.raises(ConfigError, match=r"checkpoint\.folder=.*another model.*model\.dim"):
        validate_config(tiny_config(str(tmp_path), "checkpoint.enable=true", "model.dim=32"))
    # Another stage layout is no refusal any more: DCP reshards (parameter names are the full model's).
    validate_config(tiny_config(
        str(tmp_path), "checkpoint.load=latest", "parallelism.pipeline_parallel_schedule=Interleaved1F1B",
    ))

    stage0 = os.path.join(good, next(iter(ckpt.read_manifest(good)["files"])))
    with open(stage0, "r+b") as f:  # same size, one byte flipped
        f.seek(os.path.getsize(stage0) - 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = _stages(cfg, seed_grads=None)
    with pytest.raises(ConfigError, match="sha256"):  # found before any process starts
        validate_config(tiny_config(str(tmp_path), "checkpoint.load=latest"))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_checkpoint(good, cfg=cfg, stage_ids=[0, 1], parts=fresh[0], optimizers=fresh[1], schedulers=fresh[2])
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        export.export(good, str(tmp_path / "x.safetensors"))


def test_keep_latest_k_prunes_old_checkpoints(tmp_path):
    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true", "checkpoint.keep_latest_k=2")
    stages = _stages(cfg)
    for step in (1, 2, 3):
        _save(cfg, step, stages)
    assert [s for s, _ in ckpt.find_checkpoints(str(tmp_path / "checkpoint"))] == [2, 3]


def _run(dump, *extra, env=None):
    """`pipelining-seq run` of TINY on 2 ranks (``env``: the whole environment, default this one's)."""
    cmd = [
        sys.executable, "-m", "pipelining_seq.cli", "run", "--nproc-per-node", "2", DEFAULT_RECIPE, *TINY,
        "training.steps=6", "checkpoint.enable=true", "checkpoint.interval=3", f"job.dump_folder={dump}", *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_kill_then_resume_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    a = _run(straight)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    from tests.workers.fault_helpers import inject_env

    b = _run(broken, env=inject_env(kill_after_step="4"))  # SIGKILL both ranks after step 4 (checkpoint at 3)
    assert b.returncode != 0 and "test fault: killing rank after step 4" in b.stdout + b.stderr
    assert [s for s, _ in ckpt.find_checkpoints(str(broken / "checkpoint"))] == [3]
    c = _run(broken, "checkpoint.load=latest")
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    assert "resumed from" in c.stdout + c.stderr

    final_a = ckpt.step_dir(str(straight / "checkpoint"), 6)
    final_c = ckpt.step_dir(str(broken / "checkpoint"), 6)
    shards = sorted(ckpt.read_manifest(final_a)["files"])
    assert shards == sorted(ckpt.read_manifest(final_c)["files"]) and len(shards) == 2  # one per rank
    for name in shards:
        ta, tc = load_file(os.path.join(final_a, name)), load_file(os.path.join(final_c, name))
        assert ta.keys() == tc.keys()
        for key in ta:  # weights and AdamW state, bit for bit
            assert torch.equal(ta[key], tc[key]), (name, key)
    loss_a = [line.split("| loss ")[1][:6] for line in a.stdout.splitlines() + a.stderr.splitlines() if "step 6/6" in line]
    loss_c = [line.split("| loss ")[1][:6] for line in c.stdout.splitlines() + c.stderr.splitlines() if "step 6/6" in line]
    assert loss_a == loss_c and len(loss_a) == 1

    out = str(tmp_path / "model.safetensors")
    exp = subprocess.run(
        [sys.executable, "-m", "pipelining_seq.cli", "export", str(broken / "checkpoint"), "--output", out],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert exp.returncode == 0, exp.stderr
    merged = load_file(out)
    whole = {k[len("model."):]: v for name in os.listdir(final_a) if name.endswith(".safetensors")
             for k, v in load_file(os.path.join(final_a, name)).items() if k.startswith("model.")}
    assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in whole)


@pytest.mark.slow
def test_async_save_writes_the_same_checkpoints_as_a_blocking_save(tmp_path):
    from pipelining_seq.tools.testing import run_ranks
    from tests.workers.train_workers import schedules_worker

    common = ["training.steps=6", "checkpoint.enable=true", "checkpoint.interval=3", "checkpoint.keep_latest_k=0"]
    runs = {
        "sync": [*common, "checkpoint.folder=ck_sync"],
        "async": [*common, "checkpoint.folder=ck_async", "checkpoint.async_mode=async"],
    }
    records = run_ranks(schedules_worker, 2, runs, str(tmp_path), timeout_s=300)
    assert [r["sync"]["losses"] for r in records] == [r["async"]["losses"] for r in records]
    for step in (3, 6):
        a = ckpt.step_dir(str(tmp_path / "ck_sync"), step)
        b = ckpt.step_dir(str(tmp_path / "ck_async"), step)
        ma, mb = ckpt.read_manifest(a, verify="sha256"), ckpt.read_manifest(b, verify="sha256")
        assert sorted(ma["files"]) == sorted(mb["files"])
        for name in ma["files"]:  # the same tensors (the staged copy is taken before the next step)
            ta, tb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (step, name)


def test_a_checkpoint_loads_into_another_pipeline_layout(tmp_path):
    """Full-model parameter names: 2 stages saved, 4 stages loaded (DCP reads each stage's keys)."""
    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true")
    parts, opts, scheds = _stages(cfg)
    path = _save(cfg, 3, (parts, opts, scheds))
    cfg4 = tiny_config(str(tmp_path), "parallelism.pipeline_parallel_schedule=Interleaved1F1B")
    g = cfg4.model
    with torch.device("meta"):
        full = GPT(g)
    parts4, opts4, scheds4 = [], [], []
    for s in range(4):
        part = split_stage(full, s, 4)
        part.to_empty(device="cpu")
        init_weights(part, seed=1, n_layers=g.n_layers)  # other weights: the load must replace them
        opt, sched = build_optimizer(cfg4, part)
        parts4.append(part)
        opts4.append(opt)
        scheds4.append(sched)
    assert ckpt.load_checkpoint(path, cfg=cfg4, stage_ids=[0, 1, 2, 3], parts=parts4, optimizers=opts4,
                                schedulers=scheds4) == 3
    saved = {n: p for part in parts for n, p in part.named_parameters()}
    loaded = {n: p for part in parts4 for n, p in part.named_parameters()}
    assert saved.keys() == loaded.keys()
    for n in saved:
        assert torch.equal(saved[n], loaded[n]), n
    moments = {id(p): o.state[p]["exp_avg"] for o, part in zip(opts, parts) for p in part.parameters()}
    for o, part in zip(opts4, parts4):
        for n, p in part.named_parameters():
            assert torch.equal(o.state[p]["exp_avg"], moments[id(saved[n])]), n
