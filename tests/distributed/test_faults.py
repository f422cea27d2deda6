"""Fault suite (marker ``faults``): the cases of docs/checkpoints.md, each with its new outcome.

Process-level cases start `pipelining-seq run` on 2 CPU ranks and assert the exit code,
the message's key words, the time to fail, and that no checkpoint was lost or corrupted:
NaN, SIGSTOP of a rank, kill -9 of a rank and of the launcher, SIGINT, concurrent runs,
a full disk (a small tmpfs in a user+mount namespace, skipped where that is not allowed).
The input cases (edited manifests, bad data files and recipes, resume changes, rollback,
export onto its own checkpoint) run in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipelining_seq.trainer import checkpoint as ckpt
from pipelining_seq.trainer import export
from tests.workers.fault_helpers import Launched, alive, complete_checkpoints, descendants, kill, run_cmd
from tests.workers.train_workers import DEFAULT_RECIPE, ROOT

pytestmark = pytest.mark.faults  # process-level cases are also marked slow


@pytest.mark.slow
def test_nan_stops_at_that_step_and_only_finite_checkpoints_remain(tmp_path):
    dump = str(tmp_path / "run")
    run = Launched(dump, "optimizer.lr=1e4", "training.max_norm=0", "training.steps=8", "checkpoint.enable=true",
                   "checkpoint.interval=1", "checkpoint.keep_latest_k=1", log=str(tmp_path / "log"))
    code, took = run.finish(timeout=240)
    out = run.text()
    assert code != 0, out[-3000:]
    line = next(x for x in out.splitlines() if "is not finite" in x)
    assert "step " in line and ("nan" in line or "inf" in line) and "training.skip_nonfinite_steps" in line
    bad_step = int(line.split("step ")[1].split(":")[0])
    assert bad_step < 8
    steps = complete_checkpoints(dump)  # every one intact
    assert steps == [bad_step - 1] if bad_step > 1 else steps == []
    if steps:  # the newest finite checkpoint survived pruning and exports
        out_file = str(tmp_path / "model.safetensors")
        export.export(os.path.join(dump, "checkpoint"), out_file)
        assert export.load_exported(out_file) is not None


@pytest.mark.slow
def test_sigstop_of_a_rank_is_reported_within_the_timeout(tmp_path):
    dump = str(tmp_path / "run")
    run = Launched(dump, "training.steps=2000", "comm.timeout_s=6", log=str(tmp_path / "log"))
    try:
        run.wait_for(r"step 3/2000")
        ranks = run.ranks()
        os.kill(ranks[1], signal.SIGSTOP)
        code, took = run.finish(timeout=150)
    finally:
        run.kill_all()
    out = run.text()
    assert code != 0
    assert took < 6 + 90, took  # timeout, then torchrun's grace period for the stopped rank
    line = next(x for x in out.splitlines() if "[rank0]" in x and "error:" in x)
    assert "stage 0" in line and "rank 1" in line and "step " in line and "unit " in line, line
    assert "comm.timeout_s" in line


@pytest.mark.slow
def test_kill_9_of_a_rank_ends_the_run_and_keeps_checkpoints(tmp_path):
    dump = str(tmp_path / "run")
    run = Launched(dump, "training.steps=2000", "checkpoint.enable=true", "checkpoint.interval=2",
                   log=str(tmp_path / "log"))
    try:
        run.wait_for(r"checkpoint step 2 ")
        os.kill(run.ranks()[1], signal.SIGKILL)
        code, took = run.finish(timeout=120)
    finally:
        run.kill_all()
    assert code != 0 and took < 90, (code, took)
    text = run.text()
    # Named by rank 0's own error (a p2p wait that lost its peer) or, when the kill lands in a
    # collective such as a checkpoint save, by the launcher's summary of the killed rank.
    launcher_summary = re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", text)
    assert "rank 1" in text or "died" in text or launcher_summary, text[-3000:]
    assert 2 in complete_checkpoints(dump)


@pytest.mark.slow
def test_kill_9_of_the_launcher_ends_torchrun_and_the_ranks(tmp_path):
    dump = str(tmp_path / "run")
    run = Launched(dump, "training.steps=2000", "checkpoint.enable=true", "checkpoint.interval=3",
                   log=str(tmp_path / "log"))
    try:
        run.wait_for(r"step 2/2000")
        procs = descendants(run.proc.pid)
        assert len(procs) >= 3  # torchrun and two ranks
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(p) for p in procs):
            time.sleep(0.2)
        assert not any(alive(p) for p in procs), [p for p in procs if alive(p)]
        before = complete_checkpoints(dump)
        time.sleep(3)
        assert complete_checkpoints(dump) == before  # nobody is writing any more
    finally:
        for p in procs:
            kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_sigint_stops_cleanly_with_a_checkpoint_and_a_second_run_is_refused(tmp_path):
    dump = str(tmp_path / "run")
    run = Launched(dump, "training.steps=2000", "checkpoint.enable=true", "checkpoint.interval=1000",
                   log=str(tmp_path / "log"))
    try:
        run.wait_for(r"step 2/2000")
        t = time.monotonic()
        second = subprocess.run(run_cmd(dump, "training.steps=5"), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and time.monotonic() - t < 60
        assert "in use by another run" in second.stderr and "pid " in second.stderr and "started" in second.stderr
        run.proc.send_signal(signal.SIGINT)
        code, took = run.finish(timeout=120)
    finally:
        run.kill_all()
    out = run.text()
    assert code == 128 + signal.SIGINT and took < 60, (code, took, out[-2000:])
    stops = [x for x in out.splitlines() if "stopped by" in x]
    assert len(stops) == 1 and "checkpoint saved" in stops[0], out[-2000:]
    assert "Traceback" not in out
    step = int(stops[0].split("after step ")[1].split()[0])
    assert complete_checkpoints(dump) == [step]


def _namespace_tmpfs_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "ok"


@pytest.mark.slow
@pytest.mark.skipif(not _namespace_tmpfs_ok(), reason="cannot mount a tmpfs in a user+mount namespace here")
def test_full_disk_refused_up_front_or_failing_save_keeps_earlier_checkpoints(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    check = (f"{sys.executable} -c \"from tests.workers.fault_helpers import complete_checkpoints; "
             f"print('COMPLETE', complete_checkpoints('{mnt}/run'))\"")
    # 64 KiB: refused before any process starts. 4 MiB: one checkpoint fits, the second not.
    small = " ".join(run_cmd(f"{mnt}/small", "checkpoint.enable=true"))
    full = " ".join(run_cmd(f"{mnt}/run", "training.steps=4", "checkpoint.enable=true", "checkpoint.interval=2",
                            "checkpoint.keep_latest_k=0"))
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {mnt} && {small}; echo RC1=$?; umount {mnt}; "
        f"mount -t tmpfs -o size=4m tmpfs {mnt} && {full}; echo RC2=$?; {check}"
    )
    t = time.monotonic()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=os.path.dirname(__file__), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    out = proc.stdout + proc.stderr
    assert "RC1=2" in out and "MiB free" in out and "checkpoint.keep_latest_k" in out, out[-3000:]
    assert "RC2=0" not in out and "no space left" in out and "earlier checkpoints" in out, out[-3000:]
    assert "COMPLETE [2]" in out, out[-3000:]
    assert time.monotonic() - t < 240


# ------------------------------------------------------------------------ in-process
def _saved(tmp_path, *steps, extra=()):
    from tests.distributed.test_checkpoint import _save, _stages
    from tests.workers.train_workers import tiny_config

    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true", *extra)
    stages = _stages(cfg)
    return cfg, stages, [_save(cfg, s, stages) for s in steps]


def _edit(path, **changes):
    mpath = os.path.join(path, ckpt.MANIFEST)
    with open(mpath) as f:
        m = json.load(f)
    for k, v in changes.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    with open(mpath, "w") as f:
        json.dump(m, f)


def test_edited_manifests_and_mixed_shards_are_refused(tmp_path):
    from pipelining_seq.trainer.config import ConfigError
    from pipelining_seq.trainer.validation import validate_config
    from tests.workers.train_workers import tiny_config

    cfg, _, (p3, p6) = _saved(tmp_path, 3, 6)
    for change, words in (({"step": 100}, "says step 100"), ({"step": 2}, "says step 2"), ({"files": None}, "lacks")):
        path = ckpt.step_dir(str(tmp_path / "checkpoint"), 6)
        shutil.copytree(p6, str(tmp_path / "backup"), dirs_exist_ok=True)
        _edit(path, **change)
        with pytest.raises(ckpt.CheckpointError, match=words):
            ckpt.read_manifest(path)
        with pytest.raises(ConfigError, match=words):
            validate_config(tiny_config(str(tmp_path), "checkpoint.load=latest"))
        shutil.rmtree(path)
        shutil.copytree(str(tmp_path / "backup"), path)
    # A shard of step 3 put into step 6 with a manifest entry that matches its bytes and hash.
    name = next(iter(ckpt.read_manifest(p6)["files"]))
    shutil.copy(os.path.join(p3, name), os.path.join(p6, name))
    m = ckpt.read_manifest(p3)
    _edit(p6, files={name: m["files"][name]})
    with pytest.raises(ckpt.CheckpointError, match="of step \\[3\\].*step 6"):
        ckpt.read_manifest(p6)


def test_export_onto_its_own_checkpoint_is_refused_and_nothing_is_lost(tmp_path):
    _, _, (path,) = _saved(tmp_path, 3)
    name = next(iter(ckpt.read_manifest(path)["files"]))
    target = os.path.join(path, name)
    with pytest.raises(ckpt.CheckpointError, match="inside the checkpoint"):
        export.export(path, target)
    ckpt.read_manifest(path, verify="sha256")


def test_nonfinite_state_is_never_saved_and_pruning_keeps_the_newest(tmp_path):
    import torch

    from tests.distributed.test_checkpoint import _save

    cfg, stages, (p1, p2) = _saved(tmp_path, 1, 2, extra=("checkpoint.keep_latest_k=1",))
    with torch.no_grad():
        next(stages[0][0].parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteStateError, match="step 3"):
        _save(cfg, 3, stages)
    assert [s for s, _ in ckpt.find_checkpoints(str(tmp_path / "checkpoint"))] == [2]
    assert not os.path.exists(ckpt.step_dir(str(tmp_path / "checkpoint"), 3))


def test_resume_with_a_changed_lr_is_refused_or_applied(tmp_path):
    from pipelining_seq.trainer.config import ConfigError
    from pipelining_seq.trainer.validation import validate_config
    from tests.distributed.test_checkpoint import _stages
    from tests.workers.train_workers import tiny_config

    _, _, (path,) = _saved(tmp_path, 3)
    with pytest.raises(ConfigError, match=r"optimizer\.lr: checkpoint 0\.003, recipe 0\.01.*resume_changes=apply"):
        validate_config(tiny_config(str(tmp_path), f"checkpoint.load={path}", "optimizer.lr=0.01"))
    cfg = tiny_config(str(tmp_path), f"checkpoint.load={path}", "optimizer.lr=0.01", "checkpoint.resume_changes=apply")
    validate_config(cfg)
    fresh = _stages(cfg, seed_grads=None)
    ckpt.load_checkpoint(path, cfg=cfg, stage_ids=[0, 1], parts=fresh[0], optimizers=fresh[1], schedulers=fresh[2])
    assert fresh[2][0].base_lrs[0] == 0.01  # the recipe's lr, from step 3 on


@pytest.mark.slow
def test_checkpoint_at_training_steps_says_nothing_to_do(tmp_path):
    _saved(tmp_path, 5)  # TINY trains 5 steps
    t = time.monotonic()
    proc = subprocess.run(run_cmd(str(tmp_path), "checkpoint.load=latest"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout and "training.steps" in proc.stdout
    assert "torch.distributed.run" not in proc.stdout  # no process started
    assert time.monotonic() - t < 60


def test_rollback_starts_a_new_timeline_that_latest_and_pruning_respect(tmp_path):
    from tests.distributed.test_checkpoint import _save
    from tests.workers.train_workers import tiny_config

    cfg, stages, _ = _saved(tmp_path, 3, 6, 9, extra=("checkpoint.keep_latest_k=0",))
    folder = str(tmp_path / "checkpoint")
    ckpt.start_timeline(cfg, resumed_from=3)
    assert [s for s, _ in ckpt.find_checkpoints(folder)] == [3]
    assert ckpt.resolve_load(tiny_config(str(tmp_path), "checkpoint.load=latest")).endswith("step-000003")
    cfg2 = tiny_config(str(tmp_path), "checkpoint.enable=true", "checkpoint.keep_latest_k=2")
    _save(cfg2, 6, stages)
    assert [s for s, _ in ckpt.find_checkpoints(folder)] == [3, 6]  # the resume point is kept
    abandoned = [d for d in os.listdir(folder) if d.startswith("abandoned-")]
    assert len(abandoned) == 1 and sorted(os.listdir(os.path.join(folder, abandoned[0]))) == ["step-000006", "step-000009"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["training.dataset={d}"], "is a folder"),
        (["training.dataset={empty}"], "is empty"),
        (["training.dataset={text}"], "looks like a text file.*pipelining_seq.trainer.data"),
        (["training.dataset={u32}"], "uint32 token file read as uint16.*training.dataset_dtype=uint32"),
        (["training.dataset={u16}", "training.dataset_dtype=uint32"], "uint16 token file read as uint32.*=uint16"),
        (["optimizer.betas=[0.9]"], "optimizer.betas"),
        (["job.dump_folder={text}/out"], "is a file, not a folder"),
    ],
)
def test_bad_inputs_fail_fast_naming_value_and_knob(tmp_path, extra, words):
    import torch

    from pipelining_seq.trainer.config import ConfigError, load_config
    from pipelining_seq.trainer.data import write_token_file
    from pipelining_seq.trainer.validation import validate_config

    paths = {"d": tmp_path / "dir", "empty": tmp_path / "empty.bin", "text": tmp_path / "a.txt", "u32": tmp_path / "u.bin",
             "u16": tmp_path / "u16.bin"}
    paths["d"].mkdir()
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("Plain English text, not token ids.\n" * 50)
    write_token_file(torch.randint(1, 256, (4096,)), str(paths["u32"]), dtype="uint32")
    write_token_file(torch.randint(1, 256, (4096,)), str(paths["u16"]), dtype="uint16")
    overrides = [e.format(**{k: str(v) for k, v in paths.items()}) for e in extra]
    with pytest.raises(ConfigError, match=words):
        validate_config(load_config(DEFAULT_RECIPE, [f"job.dump_folder={tmp_path}/out", *overrides]))


@pytest.mark.slow
def test_cli_refusals_without_processes(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    for args, words in (
        (["validate", str(bad)], "holds a list"),
        (["run", "--nproc-per-node", "0", DEFAULT_RECIPE, f"job.dump_folder={tmp_path}"], "--nproc-per-node 0"),
        (["simulate", "--chunks", "-2"], "--chunks -2"),
        (["plan", DEFAULT_RECIPE, "--gpu-memory", "0"], "--gpu-memory 0"),
    ):
        proc = subprocess.run([sys.executable, "-m", "pipelining_seq.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and words in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "per_rank, call, key",
    [
        ([{"k": 2}, {"k": 4}], "eval", "n_seq_chunks"),
        ([{"m": 2}, {"m": 4}], "step", "n_microbatches"),
        ([{"partition": [10, 6]}, {"partition": [8, 8]}], "step", "seq_partition"),
        ([{}, {}], "eval", None),
    ],
)
@pytest.mark.slow
def test_ranks_that_disagree_are_stopped_before_any_unit_runs(per_rank, call, key):
    from pipelining_seq.tools.testing import run_ranks
    from tests.workers.fault_helpers import mismatch_worker

    t = time.monotonic()
    out = run_ranks(mismatch_worker, 2, per_rank, call, timeout_s=60)
    if key is None:
        assert out == ["ok", "ok"]
        return
    for msg in out:
        assert f"disagree on {key}" in msg and "rank(s) [0]" in msg and "rank(s) [1]" in msg, msg
    assert time.monotonic() - t < 90


@pytest.mark.slow
def test_trainer_ranks_with_different_recipes_are_stopped_naming_the_field(tmp_path):
    from pipelining_seq.tools.testing import run_ranks
    from tests.workers.fault_helpers import recipe_mismatch_worker

    per_rank = [["model.n_layers=4"], ["model.n_layers=2"]]
    out = run_ranks(recipe_mismatch_worker, 2, per_rank, str(tmp_path), timeout_s=60)
    for msg in out:
        assert "recipe: ranks disagree on model.n_layers: 4 on rank(s) [0]; 2 on rank(s) [1]" in msg, msg


def test_simulated_enospc_during_a_save_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    """The full-disk case without a tmpfs: the storage writer raises ENOSPC."""
    import errno

    import torch.distributed.checkpoint as dcp

    from tests.distributed.test_checkpoint import _save

    cfg, stages, (p3,) = _saved(tmp_path, 3, extra=("checkpoint.keep_latest_k=1",))

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp.HuggingFaceStorageWriter, "write_data", full)
    with pytest.raises(ckpt.CheckpointSaveError, match="step 6.*no space left.*earlier checkpoints.*intact"):
        _save(cfg, 6, stages)
    assert [s for s, _ in ckpt.find_checkpoints(str(tmp_path / "checkpoint"))] == [3]
    ckpt.read_manifest(p3, verify="sha256")
