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
from fault_helpers import complete_checkpoints
from train_workers import ROOT, tiny_config

from pipelining_seq.trainer import checkpoint as ckpt
from pipelining_seq.trainer import export, lock

pytestmark = pytest.mark.faults


def _saved(tmp_path, *steps, extra=()):
    from test_checkpoint import _save, _stages

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
