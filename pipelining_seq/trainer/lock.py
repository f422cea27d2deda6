"""One run per folder: ``job.dump_folder`` and every folder a run writes into.

Two runs writing into one folder overwrite each other's checkpoints and logs (a second
run would even move the first one's live checkpoints aside as an abandoned timeline).
Rank 0 takes an exclusive ``flock`` on ``<folder>/.lock`` of each folder the run writes
(:func:`run_folders`: the dump folder, ``checkpoint.folder``, the TensorBoard and trace
folders, wherever they are) for the whole run and writes its pid, host and start time
into it; a second run finds a lock taken and is refused naming the folder's knob and
those. The kernel drops the lock when the process dies (even by SIGKILL), so a
crashed run never leaves a stale lock behind. ``pipelining-seq run`` checks it before
starting any process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["FolderBusyError", "busy", "busy_error", "hold", "hold_for_job", "holder", "lock_path", "run_folders"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class FolderBusyError(RuntimeError):
    """Another run holds the dump folder."""


def lock_path(dump_folder: str) -> str:
    return os.path.join(dump_folder, LOCK_NAME)


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def busy_error(folder: str, info: dict[str, Any], *, knob: str = "job.dump_folder") -> FolderBusyError:
    return FolderBusyError(
        f"{knob}={folder} is in use by another run ({_describe(info)}): wait for it to end, "
        f"stop it, or set {knob} to another folder"
    )


def run_folders(cfg: Any) -> dict[str, str]:
    """``{knob: folder}`` of every folder a run of ``cfg`` (a JobConfig) writes into.

    Each is locked on its own, even when nested in the dump folder: another run's
    ``checkpoint.folder`` may point into this run's dump folder.
    """
    from .layout import resolve_path

    out = {"job.dump_folder": cfg.job.dump_folder}
    if cfg.checkpoint.enable:
        out["checkpoint.folder"] = resolve_path(cfg, cfg.checkpoint.folder)
    if cfg.metrics.enable_tensorboard:
        out["metrics.save_tb_folder"] = resolve_path(cfg, cfg.metrics.save_tb_folder)
    if cfg.profiling.enable_profiling:
        out["profiling.save_traces_folder"] = resolve_path(cfg, cfg.profiling.save_traces_folder)
    seen: set[str] = set()
    unique = {}
    for knob, folder in out.items():
        real = os.path.realpath(folder)
        if real not in seen:
            seen.add(real)
            unique[knob] = folder
    return unique


def busy(folders: dict[str, str]) -> FolderBusyError | None:
    """The refusal for the first of ``folders`` ({knob: folder}) a live run holds, else None."""
    for knob, folder in folders.items():
        info = holder(folder)
        if info is not None:
            return busy_error(folder, info, knob=knob)
    return None


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def holder(dump_folder: str) -> dict[str, Any] | None:
    """The lock file's content if a live run holds the folder, else None (takes no lock)."""
    path = lock_path(dump_folder)
    if not os.path.exists(path):
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(path) or {"pid": "?"}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def hold(dump_folder: str, *, command: str = "", knob: str = "job.dump_folder") -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block; raise :class:`FolderBusyError` if taken."""
    os.makedirs(dump_folder, exist_ok=True)
    path = lock_path(dump_folder)
    f = open(path, "a+")  # noqa: SIM115 - held open for the block
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy_error(dump_folder, _read(path), knob=knob) from None
        info = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command,
        }
        f.seek(0)
        f.truncate()
        json.dump(info, f)
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


@contextlib.contextmanager
def hold_for_job(folders: str | dict[str, str], *, command: str = "") -> Iterator[None]:
    """Collective: rank 0 holds the locks of ``folders`` (a dump folder, or ``{knob: folder}``
    as :func:`run_folders` gives) for the block; every rank raises :class:`FolderBusyError`
    (rank 0's message) when another run holds one."""
    import torch.distributed as dist

    if isinstance(folders, str):
        folders = {"job.dump_folder": folders}
    rank = dist.get_rank() if dist.is_initialized() else 0
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                for knob, folder in folders.items():
                    stack.enter_context(hold(folder, command=command, knob=knob))
            except FolderBusyError as e:
                error = str(e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise FolderBusyError(error)
        yield
