"""Helpers of the fault suite: start `pipelining-seq run` in the background, find its ranks,
wait for log lines, and check what is left in the checkpoint folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from pipelining_seq.trainer import checkpoint as ckpt
from tests.workers.train_workers import DEFAULT_RECIPE, ROOT, TINY

FAST = [*TINY, "metrics.log_freq=1", "comm.timeout_s=20"]
INJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_inject")


def inject_env(**faults: str) -> dict[str, str]:
    """The environment for a run whose ranks get ``faults`` injected (see fault_inject/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (INJECT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **{f"PIPELINING_SEQ_TEST_{k.upper()}": v for k, v in faults.items()}}


def run_cmd(dump: str, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "pipelining_seq.cli", "run", "--nproc-per-node", str(nproc), DEFAULT_RECIPE,
            *FAST, f"job.dump_folder={dump}", *extra]


class Launched:
    """A `pipelining-seq run` in the background, its output in a file."""

    def __init__(self, dump: str, *extra: str, log: str) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in finish()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(run_cmd(dump, *extra), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, pattern: str, timeout: float = 180.0) -> float:
        """Seconds until ``pattern`` (a regex) appears in the output; fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return time.monotonic() - self.t0
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text()[-3000:]}")

    def finish(self, timeout: float = 180.0) -> tuple[int, float]:
        """(exit code, seconds it took from now)."""
        t = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        return code, time.monotonic() - t

    def ranks(self, world: int = 2, timeout: float = 60.0) -> dict[int, int]:
        """{rank: pid} of its training processes (grandchildren: launcher -> torchrun -> ranks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {}
            for torchrun in children(self.proc.pid):
                for pid in children(torchrun):
                    rank = _env(pid).get("RANK")
                    if rank is not None:
                        found[int(rank)] = pid
            if len(found) == world:
                return found
            time.sleep(0.2)
        raise AssertionError(f"ranks not found: {self.text()[-2000:]}")

    def kill_all(self) -> None:
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    out[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def children(pid: int) -> list[int]:
    return [p for p, parent in _ppids().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    ppids, out, todo = _ppids(), [], [pid]
    while todo:
        cur = todo.pop()
        kids = [p for p, parent in ppids.items() if parent == cur]
        out += kids
        todo += kids
    return out


def _env(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def complete_checkpoints(dump: str) -> list[int]:
    """Steps of the checkpoints that pass every check (sizes, steps, sha256)."""
    ok = []
    for step, path in ckpt.find_checkpoints(os.path.join(dump, "checkpoint")):
        ckpt.read_manifest(path, verify="sha256")  # raises if lost or corrupted
        ok.append(step)
    return ok


def mismatch_worker(rank: int, world: int, per_rank: list[dict], call: str) -> str:
    """Build a ScheduleSeq1F1B with this rank's settings and run ``call`` (step/eval) once;
    return the error message (or "ok")."""
    import torch

    from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage
    from pipelining_seq.agreement import AgreementError
    from pipelining_seq.models import split_stage
    from tests.workers.parity_worker import ce_loss, make_batch, make_model

    mine = per_rank[rank]
    part = split_stage(make_model(), rank, world)
    stage = SequencePipelineStage(part, rank, world, torch.device("cpu"))
    sched = ScheduleSeq1F1B(stage, mine.get("m", 2), ce_loss, n_seq_chunks=mine.get("k", 2),
                            seq_partition=mine.get("partition", "uniform"))
    x, y = make_batch(4, 16)
    args = (x,) if rank == 0 else ()
    target = y if rank == world - 1 else None
    try:
        if call == "eval":
            with torch.no_grad():
                sched.eval(*args, target=target, losses=[] if target is not None else None)
        else:
            sched.step(*args, target=target, losses=[] if target is not None else None)
    except AgreementError as e:
        return str(e)
    return "ok"


def recipe_mismatch_worker(rank: int, world: int, per_rank: list[list[str]], dump: str) -> str:
    """train() with this rank's overrides; the agreement error, or "ok"."""
    from pipelining_seq.agreement import AgreementError
    from pipelining_seq.trainer.train import train
    from tests.workers.train_workers import tiny_config

    try:
        train(tiny_config(dump, *per_rank[rank]))
    except AgreementError as e:
        return str(e)
    return "ok"


def async_nonfinite_worker(rank: int, world: int, dump: str) -> str:
    """Train with asynchronous saves every step until the loss turns NaN; the error's words."""
    from pipelining_seq.trainer.nonfinite import NonFiniteError
    from pipelining_seq.trainer.train import train
    from tests.workers.train_workers import tiny_config

    cfg = tiny_config(dump, "optimizer.lr=1e4", "training.max_norm=0", "training.steps=8", "checkpoint.enable=true",
                      "checkpoint.interval=1", "checkpoint.keep_latest_k=1", "checkpoint.async_mode=async")
    try:
        train(cfg)
    except NonFiniteError as e:
        return str(e)
    return "ok"


def unshared_storage_worker(rank: int, world: int, base: str) -> str:
    """Each rank saves into a folder of its own, as two nodes without shared storage would."""
    from tests.distributed.test_checkpoint import _stages
    from tests.workers.train_workers import tiny_config

    cfg = tiny_config(os.path.join(base, "checkpoint"), "checkpoint.enable=true",
                      f"checkpoint.folder={os.path.join(base, f'node{rank}')}")
    parts, opts, scheds = _stages(cfg)
    try:
        ckpt.save_checkpoint(cfg=cfg, step=2, stage_ids=[rank], parts=[parts[rank]], optimizers=[opts[rank]],
                             schedulers=[scheds[rank]])
    except ckpt.CheckpointSaveError as e:
        return str(e)
    return "ok"


def _schedule(kind: str, rank: int, world: int, loss_fn, *, m: int = 2, k: int = 2):
    """(schedule, whole model) of ``kind`` (Seq1F1B / ZeroBubble / Interleaved) on this rank."""
    import torch

    from pipelining_seq import (
        ScheduleInterleavedSeq1F1B,
        ScheduleSeq1F1B,
        ScheduleSeq1F1BZeroBubble,
        SequencePipelineStage,
    )
    from pipelining_seq.models import split_stage
    from tests.workers.parity_worker import make_model

    v = 2 if kind == "Interleaved" else 1
    n = world * v
    model = make_model(n_layers=max(4, n))
    ids = list(range(rank, n, world))
    stages = [SequencePipelineStage(split_stage(model, s, n), s, n, torch.device("cpu")) for s in ids]
    cls = {"Seq1F1B": ScheduleSeq1F1B, "ZeroBubble": ScheduleSeq1F1BZeroBubble,
           "Interleaved": ScheduleInterleavedSeq1F1B}[kind]
    return cls(stages if v > 1 else stages[0], m, loss_fn, n_seq_chunks=k), model


def eval_worker(rank: int, world: int, kind: str) -> dict:
    """eval() without a loss, then with a loss_fn but no targets, against one process's forward;
    then a smaller batch: refused on the first rank, named as a stalled peer elsewhere."""
    import torch

    from pipelining_seq import p2p
    from tests.workers.parity_worker import ce_loss, make_batch

    p2p.set_timeout(5)
    out: dict = {}
    for name, loss_fn in (("no_loss", None), ("loss_no_target", ce_loss)):
        sched, model = _schedule(kind, rank, world, loss_fn)
        x, _ = make_batch(8, 16)
        with torch.no_grad():
            got = sched.eval(*((x,) if rank == 0 else ()))
            if got is not None:
                out[name] = float((got - model(x)).abs().max()) if got.shape == (8, 16, 64) else f"shape {got.shape}"
        if name == "loss_no_target" and rank == world - 1:
            try:
                sched.eval(losses=[])
            except ValueError as e:
                out["losses_without_target"] = str(e)
    x4, _ = make_batch(4, 16)
    try:
        with torch.no_grad():
            got = sched.eval(*((x4,) if rank == 0 else ()))
        out["smaller"] = f"returned {None if got is None else tuple(got.shape)}"
    except (ValueError, p2p.PeerError) as e:
        out["smaller"] = f"{type(e).__name__}: {e}"
    return out


def stalled_peer_worker(rank: int, world: int) -> str:
    """Rank 1 never calls step(): rank 0's first step waits in the agreement's all_gather."""
    import time

    from pipelining_seq import p2p
    from tests.workers.parity_worker import ce_loss, make_batch

    p2p.set_timeout(3)
    sched, _ = _schedule("Seq1F1B", rank, world, ce_loss)
    if rank == 1:
        time.sleep(8)
        return "slept"
    x, _ = make_batch(4, 16)
    try:
        sched.step(x)
    except p2p.PeerError as e:
        return str(e)
    return "ok"
