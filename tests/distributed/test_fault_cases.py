"""Fault suite, second set (marker ``faults``): shared checkpoint folders, exports into
checkpoints, async saves cut short, nodes without shared storage, stopped runs' exit
codes, changed data on resume, bad numbers in recipes and in the public API's arguments.

Process-level cases start `pipelining-seq run` on 2 CPU ranks (also marked ``slow``);
the rest run in-process or on 2 spawned ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelining_seq.trainer import checkpoint as ckpt
from pipelining_seq.trainer import export, lock
from tests.workers.fault_helpers import complete_checkpoints
from tests.workers.train_workers import ROOT, tiny_config

pytestmark = pytest.mark.faults


def _saved(tmp_path, *steps, extra=()):
    from tests.distributed.test_checkpoint import _save, _stages

    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true", *extra)
    stages = _stages(cfg)
    return cfg, stages, [_save(cfg, s, stages) for s in steps]


# ------------------------------------------------------------------- folders and export
def test_a_checkpoint_folder_shared_by_two_runs_is_locked(tmp_path):
    shared = str(tmp_path / "shared-checkpoints")
    first = tiny_config(str(tmp_path / "a"), "checkpoint.enable=true", f"checkpoint.folder={shared}")
    second = tiny_config(str(tmp_path / "b"), "checkpoint.enable=true", f"checkpoint.folder={shared}")
    # Another run's checkpoint.folder pointing into this run's dump folder is caught too.
    nested = tiny_config(str(tmp_path / "c"), "checkpoint.enable=true",
                         f"checkpoint.folder={tmp_path / 'a' / 'checkpoint-x'}")
    inner = tiny_config(str(tmp_path / "d"), "checkpoint.enable=true",
                        f"checkpoint.folder={tmp_path / 'a' / 'checkpoint'}")
    assert lock.run_folders(first) == {"job.dump_folder": str(tmp_path / "a"), "checkpoint.folder": shared}
    with lock.hold_for_job(lock.run_folders(first), command="first"):
        err = lock.busy(lock.run_folders(second))
        assert err is not None and f"checkpoint.folder={shared} is in use by another run (pid {os.getpid()}" in str(err)
        with pytest.raises(lock.FolderBusyError, match="checkpoint.folder=.* is in use"):
            with lock.hold_for_job(lock.run_folders(second)):
                pass
        assert lock.busy(lock.run_folders(nested)) is None  # a folder of its own
        with lock.hold_for_job(lock.run_folders(tiny_config(str(tmp_path / "e"), "checkpoint.enable=true",
                                                            f"checkpoint.folder={tmp_path / 'a' / 'checkpoint'}"))):
            pass  # ... while `first` writes into `shared`, its own default checkpoint folder is free
    with lock.hold_for_job(lock.run_folders(tiny_config(str(tmp_path / "a"), "checkpoint.enable=true"))):
        assert "checkpoint.folder" in str(lock.busy(lock.run_folders(inner)))
    assert lock.busy(lock.run_folders(second)) is None  # released


def test_export_into_any_checkpoint_folder_is_refused_and_nothing_is_lost(tmp_path):
    _, _, (p2, p4) = _saved(tmp_path, 2, 4)
    root = str(tmp_path / "checkpoint")
    shard2 = os.path.join(p2, next(iter(ckpt.read_manifest(p2)["files"])))
    for target in (shard2, os.path.join(p2, "model.safetensors"), os.path.join(root, "model.safetensors"),
                   os.path.join(p4, "sub", "x.safetensors")):
        with pytest.raises(ckpt.CheckpointError, match="inside the checkpoint folder"):
            export.export(root, target)  # exports step 4; step 2's shard must survive
    assert complete_checkpoints(str(tmp_path)) == [2, 4]
    ckpt.read_manifest(p2, verify="sha256")


@pytest.mark.slow
def test_export_to_a_folder_a_missing_or_read_only_place_or_from_no_checkpoint(tmp_path):
    _, _, (p3,) = _saved(tmp_path, 3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="is a folder"):
        export.export(p3, str(out_dir))
    assert os.listdir(out_dir) == []  # no temp file left
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        export.export(p3, str(tmp_path / "missing" / "m.safetensors"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # root writes anywhere
            with pytest.raises(ckpt.CheckpointError, match="not writable"):
                export.export(p3, str(ro / "m.safetensors"))
    finally:
        ro.chmod(0o755)
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="is no checkpoint") as e:
        export.export(str(empty), str(tmp_path / "m.safetensors"))
    assert "interrupted" not in str(e.value)
    proc = subprocess.run([sys.executable, "-m", "pipelining_seq.cli", "export", p3, "-o", str(out_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is a folder" in proc.stderr and "Traceback" not in proc.stderr


# -------------------------------------------------------------------- processes (slow)
@pytest.mark.slow
def test_sigterm_to_a_rank_exits_non_zero_and_a_run_into_the_same_checkpoint_folder_is_refused(tmp_path):
    import signal
    import time

    from tests.workers.fault_helpers import Launched, run_cmd

    shared = str(tmp_path / "shared-checkpoints")
    run = Launched(str(tmp_path / "a"), "training.steps=2000", "checkpoint.enable=true", "checkpoint.interval=1000",
                   f"checkpoint.folder={shared}", log=str(tmp_path / "log"))
    try:
        run.wait_for(r"step 2/2000")
        second = subprocess.run(run_cmd(str(tmp_path / "b"), "checkpoint.enable=true", f"checkpoint.folder={shared}"),
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"checkpoint.folder={shared} is in use by another run (pid" in second.stderr
        os.kill(run.ranks()[1], signal.SIGTERM)
        t = time.monotonic()
        code, _ = run.finish(timeout=120)
        took = time.monotonic() - t
    finally:
        run.kill_all()
    out = run.text()
    assert code == 128 + signal.SIGTERM and took < 90, (code, took, out[-3000:])
    line = next(x for x in out.splitlines() if "[rank0]" in x and "stopped by" in x)
    step = int(line.split("after step ")[1].split()[0])
    assert f"after step {step} of 2000 (checkpoint saved); resume with checkpoint.load=latest" in line, line
    assert "Traceback" not in out and "ChildFailedError" not in out
    assert [s for s, _ in ckpt.find_checkpoints(shared)] == [step]
    ckpt.read_manifest(ckpt.step_dir(shared, step), verify="sha256")


@pytest.mark.slow
def test_sigstop_of_a_rank_ends_the_run_within_the_timeout_and_ten_seconds(tmp_path):
    import signal
    import time

    from tests.workers.fault_helpers import Launched

    timeout_s = 10
    run = Launched(str(tmp_path / "run"), "training.steps=2000", f"comm.timeout_s={timeout_s}",
                   log=str(tmp_path / "log"))
    try:
        run.wait_for(r"step 3/2000")
        os.kill(run.ranks()[1], signal.SIGSTOP)
        t = time.monotonic()
        code, _ = run.finish(timeout=150)
        took = time.monotonic() - t
    finally:
        run.kill_all()
    out = run.text()
    assert code != 0, out[-3000:]
    # torchrun alone waits 30 s more for the stopped rank to act on its SIGTERM.
    assert took < timeout_s + 10 + 5, (took, out[-3000:])  # + 5 s: process exit on a loaded machine
    line = next(x for x in out.splitlines() if "[rank0]" in x and "error:" in x)
    assert "stage 0" in line and "rank 1" in line and "comm.timeout_s" in line, line


# --------------------------------------------------------------- two ranks, in-process
@pytest.mark.slow
def test_async_save_cut_short_by_a_nonfinite_stop_keeps_its_manifest(tmp_path):
    from pipelining_seq.tools.testing import run_ranks
    from tests.workers.fault_helpers import async_nonfinite_worker

    out = run_ranks(async_nonfinite_worker, 2, str(tmp_path), timeout_s=180)
    assert all("is not finite" in msg for msg in out), out
    bad_step = int(out[0].split("step ")[1].split(":")[0])
    assert bad_step > 1, out[0]
    # The last finite step's save was still in flight: it gets its manifest, so latest finds it.
    assert complete_checkpoints(str(tmp_path)) == [bad_step - 1]


@pytest.mark.slow
def test_nodes_without_shared_storage_are_refused_before_the_manifest(tmp_path):
    from pipelining_seq.tools.testing import run_ranks
    from tests.workers.fault_helpers import unshared_storage_worker

    out = run_ranks(unshared_storage_worker, 2, str(tmp_path), timeout_s=180)
    for msg in out:
        assert "checkpoint.folder must be storage shared by all nodes" in msg and "does not see" in msg, msg
        assert "shard-0000" in msg, msg
    for node in ("node0", "node1"):
        assert not os.path.exists(os.path.join(tmp_path, node, "step-000002", ckpt.MANIFEST))


def test_a_manifest_missing_a_ranks_shard_is_refused_by_validate(tmp_path):
    """What an unshared save left before: node 0's manifest listing only its own shard."""
    import json

    from pipelining_seq.trainer.config import ConfigError
    from pipelining_seq.trainer.validation import validate_config

    _, _, (path,) = _saved(tmp_path, 2)
    with open(os.path.join(path, ckpt.MANIFEST)) as f:
        manifest = json.load(f)
    manifest["world_size"] = 2  # saved by two ranks; rank 1's shard never reached this disk
    with open(os.path.join(path, ckpt.MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ckpt.CheckpointError, match=r"no shard of rank\(s\) \[1\].*storage shared by all nodes"):
        ckpt.read_manifest(path)
    with pytest.raises(ConfigError, match=r"no shard of rank\(s\) \[1\]"):
        validate_config(tiny_config(str(tmp_path), "checkpoint.load=latest"))


# ------------------------------------------------------------------- recipes and resume
@pytest.mark.parametrize(
    "overrides, words",
    [
        (["comm.timeout_s=nan"], r"comm.timeout_s=nan must be a number of seconds"),
        (["comm.timeout_s=inf"], r"comm.timeout_s=inf must be a number of seconds"),
        (["comm.timeout_s=-5"], r"comm.timeout_s=-5.0 must be a number of seconds"),
        (["job.dump_folder=/proc/pipelining-seq-run"], r"job.dump_folder=/proc/pipelining-seq-run: cannot create"),
        (["model.dim=100000", "checkpoint.enable=false"], r"model.dim=100000.*more than this machine's.*lower model.dim"),
    ],
)
def test_recipes_that_would_kill_the_ranks_are_refused_by_validate(tmp_path, overrides, words):
    from pipelining_seq.trainer.config import ConfigError
    from pipelining_seq.trainer.validation import validate_config

    if overrides[0].startswith("job.dump_folder=/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    with pytest.raises(ConfigError, match=words):
        validate_config(tiny_config(str(tmp_path), *overrides))


def test_plan_checks_the_recipe_not_this_machine(tmp_path, capsys):
    from pipelining_seq.cli import main as cli_main

    rc = cli_main(["plan", "paper/gpt7b_32k_seq1f1b", "training.dataset=/not/here.bin",
                   f"job.dump_folder={tmp_path}/out", "checkpoint.load=/no/such/checkpoint"])
    out = capsys.readouterr().out
    assert rc == 0 and "predicted peak" in out, out[-2000:]
    # Recipe errors are still refused.
    assert cli_main(["plan", "paper/gpt7b_32k_seq1f1b", "comm.timeout_s=nan"]) == 2
    assert "comm.timeout_s=nan" in capsys.readouterr().out


def test_a_data_file_replaced_at_the_same_path_is_a_changed_setting(tmp_path):
    import torch

    from pipelining_seq.trainer.config import ConfigError
    from pipelining_seq.trainer.data import write_token_file
    from pipelining_seq.trainer.validation import validate_config

    data = str(tmp_path / "tokens.bin")
    write_token_file(torch.randint(1, 256, (8192,), generator=torch.Generator().manual_seed(0)), data)
    _saved(tmp_path, 2, extra=(f"training.dataset={data}",))
    validate_config(tiny_config(str(tmp_path), f"training.dataset={data}", "checkpoint.load=latest"))
    write_token_file(torch.randint(1, 256, (8192,), generator=torch.Generator().manual_seed(1)), data)
    with pytest.raises(ConfigError, match=r"training.dataset=.*content: checkpoint 16384 bytes, sha256 .* file now"):
        validate_config(tiny_config(str(tmp_path), f"training.dataset={data}", "checkpoint.load=latest"))
    validate_config(tiny_config(str(tmp_path), f"training.dataset={data}", "checkpoint.load=latest",
                                "checkpoint.resume_changes=apply"))


def test_document_masking_changed_on_resume_is_refused(tmp_path):
    from pipelining_seq.trainer.config import ConfigError
    from pipelining_seq.trainer.validation import validate_config

    _saved(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"training.document_masking: checkpoint False, recipe True"):
        validate_config(tiny_config(str(tmp_path), "training.document_masking=true", "checkpoint.load=latest"))


# ----------------------------------------------------------------- the public API's own
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Seq1F1B", "ZeroBubble", "Interleaved"])
def test_eval_returns_exactly_the_batch_and_refuses_a_smaller_one(kind):
    from pipelining_seq.tools.testing import run_ranks
    from tests.workers.fault_helpers import eval_worker

    first, last = run_ranks(eval_worker, 2, kind, timeout_s=120)
    # The last rank's outputs equal a single-process forward, with or without a loss_fn.
    assert last["no_loss"] < 1e-12 and last["loss_no_target"] < 1e-12, last
    assert "no target=" in last["losses_without_target"] and "without losses=" in last["losses_without_target"]
    # A smaller batch: refused where it is given, before any communication; the peer
    # names the stalled wait; no stale rows come back.
    assert first["smaller"].startswith("ValueError:") and "batch size 4 differs from 8" in first["smaller"], first
    assert last["smaller"].startswith("PeerError:") and "rank 0" in last["smaller"], last


@pytest.mark.slow
def test_a_stalled_peer_in_a_script_is_named_by_the_first_steps_agreement():
    from pipelining_seq.tools.testing import run_ranks
    from tests.workers.fault_helpers import stalled_peer_worker

    msg, _ = run_ranks(stalled_peer_worker, 2, timeout_s=120)
    assert msg.startswith("stage 0") and "agreement all_gather" in msg and "no answer from rank 1" in msg, msg
    assert "p2p.set_timeout" in msg, msg


@pytest.mark.slow
def test_the_public_api_waits_are_bounded_by_default():
    code = ("from pipelining_seq import p2p; print(p2p.context()['timeout_s'], p2p.DEFAULT_TIMEOUT_S)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["300.0", "300.0"], out


@pytest.mark.parametrize("kind", ["Seq1F1B", "ZeroBubble"])
def test_a_changed_batch_size_is_refused_on_the_calling_rank_before_any_communication(world_of_one, kind):
    import torch

    from tests.workers.fault_helpers import _schedule
    from tests.workers.parity_worker import ce_loss, make_batch

    sched, _ = _schedule(kind, 0, 1, ce_loss)
    x, y = make_batch(8, 16)
    sched.step(x, target=y, losses=[])
    x4, y4 = make_batch(4, 16)
    with pytest.raises(ValueError, match=r"input batch size 4 differs from 8 of the first step/eval call") as e:
        sched.step(x4, target=y4, losses=[])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="target batch size 4 differs from 8"):
        sched.step(x, target=y4, losses=[])
    with torch.no_grad():
        with pytest.raises(ValueError, match="batch size 4 differs"):
            sched.eval(x4)
    sched.step(x, target=y, losses=[])  # the first size still runs


@pytest.mark.parametrize("args, words", [
    (("256", 4), "seq_len='256' must be a positive integer"),
    ((-256, 4), "seq_len=-256 must be a positive integer"),
    ((256, True), "n_chunks=True must be a positive integer"),
    ((256.0, 4), "seq_len=256.0 must be a positive integer"),
    ((256, 4, 0), "multiple_of=0: must be a positive integer"),
])
def test_partition_arguments_are_checked_like_the_schedules(args, words):
    from pipelining_seq import balanced_partition
    from pipelining_seq.partition import uniform_partition

    seq, k, *mult = args
    kw = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=88, vocab_size=64)
    with pytest.raises(ValueError, match=words):
        balanced_partition(seq, k, **kw, **({"multiple_of": mult[0]} if mult else {}))
    if not mult:
        with pytest.raises(ValueError, match=words):
            uniform_partition(seq, k)


def test_the_package_ships_no_fault_injector():
    """Faults are injected by the tests (tests/workers/fault_inject), never by a hook in the package."""
    import pathlib

    import pipelining_seq

    root = pathlib.Path(pipelining_seq.__file__).parent
    hooks = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if "KILL_AT_STEP" in p.read_text() or "os.getpid(), signal.SIGKILL" in p.read_text()]
    assert hooks == []
