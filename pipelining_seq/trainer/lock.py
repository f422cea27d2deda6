"""One run per ``job.dump_folder``.

Two runs writing into one folder overwrite each other's checkpoints and logs. Rank 0
takes an exclusive ``flock`` on ``<dump_folder>/.lock`` for the whole run and writes its
pid, host and start time into it; a second run finds the lock taken and is refused
naming those. The kernel drops the lock when the process dies (even by SIGKILL), so a
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

__all__ = ["FolderBusyError", "hold", "hold_for_job", "holder", "lock_path"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class FolderBusyError(RuntimeError):
    """Another run holds the dump folder."""


def lock_path(dump_folder: str) -> str:
    return os.path.join(dump_folder, LOCK_NAME)


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def busy_error(dump_folder: str, info: dict[str, Any]) -> FolderBusyError:
    return FolderBusyError(
        f"job.dump_folder={dump_folder} is in use by another run ({_describe(info)}): wait for it to end, "
        "stop it, or set job.dump_folder to another folder"
    )


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
def hold(dump_folder: str, *, command: str = "") -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block; raise :class:`FolderBusyError` if taken."""
    os.makedirs(dump_folder, exist_ok=True)
    path = lock_path(dump_folder)
    f = open(path, "a+")  # noqa: SIM115 - held open for the block
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy_error(dump_folder, _read(path)) from None
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
def hold_for_job(dump_folder: str, *, command: str = "") -> Iterator[None]:
    """Collective: rank 0 holds the lock for the block; every rank raises
    :class:`FolderBusyError` (rank 0's message) when another run holds it."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(hold(dump_folder, command=command))
            except FolderBusyError as e:
                error = str(e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise FolderBusyError(error)
        yield
