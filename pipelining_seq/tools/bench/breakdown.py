"""``bench breakdown``: where one step's time goes, per rank, for the Seq1F1B schedules.

Each rank's stages have their compute methods wrapped with timers (forward, full or
input backward, weight pass) and every wait on a batch of pipeline sends/receives is
timed (:func:`pipelining_seq._compat.timed_p2p_waits`, torch's executor and ours). What
is left of the step's wall time is the executor's own work: Python between actions,
posting receives, the loss, gradient scaling. Figures are means over the timed steps,
in seconds per step; every step starts after a barrier.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch.distributed as dist

from ... import _compat
from ..testing import run_ranks
from .common import (
    SEQ_SCHEDULES,
    BenchModel,
    add_model_arguments,
    build_schedule,
    env_info,
    make_batch,
    make_model,
    model_from_args,
    out_dir,
    partition_lengths,
    print_table,
    run_step,
    write_results,
)

__all__ = ["CATEGORIES", "StepTimers", "add_arguments", "breakdown_worker", "load_average", "main"]

logger = logging.getLogger(__name__)

CATEGORIES = ("F", "B", "I", "W", "wait", "executor")
"""Forward, full backward, input backward, weight pass, waiting on p2p, the rest."""


class StepTimers:
    """Seconds per category over the steps run inside :meth:`step` (see module docs)."""

    def __init__(self, stages: Sequence[Any]) -> None:
        self.stages = list(stages)
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.steps = 0

    def _add(self, key: str, seconds: float) -> None:
        self.totals[key] += seconds
        self.counts[key] += 1

    def _timed(self, key_of: Any, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(key_of(*args, **kwargs), time.perf_counter() - t0)
        return timed

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time one step (wrappers installed for its duration only)."""
        def bwd_key(*args: Any, full_backward: bool = True, **kwargs: Any) -> str:
            full = args[2] if len(args) > 2 else full_backward
            return "B" if full else "I"

        for s in self.stages:
            s.forward_one_chunk = self._timed(lambda *a, **k: "F", s.forward_one_chunk)
            s.backward_one_chunk = self._timed(bwd_key, s.backward_one_chunk)
            s.backward_weight_one_chunk = self._timed(lambda *a, **k: "W", s.backward_weight_one_chunk)
        t0 = time.perf_counter()
        try:
            with _compat.timed_p2p_waits(lambda sec: self._add("wait", sec)):
                yield
        finally:
            self.totals["step"] += time.perf_counter() - t0
            self.steps += 1
            for s in self.stages:
                for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                    vars(s).pop(name, None)

    def summary(self) -> dict[str, float]:
        """Mean seconds per step of each category, ``executor`` = the rest of ``step``."""
        n = max(self.steps, 1)
        out = {k: self.totals.get(k, 0.0) / n for k in ("step", *CATEGORIES[:-1])}
        out["executor"] = out["step"] - sum(out[k] for k in CATEGORIES[:-1])
        out["n_wait"] = self.counts.get("wait", 0) / n
        return out


def breakdown_worker(rank: int, world: int, cfg: BenchModel, configs: list[dict], warmup: int,
                     repeats: int) -> list[dict]:
    out = []
    for c in configs:
        x, y = make_batch(cfg, c["m"])
        sched, stages = build_schedule(c["schedule"], make_model(cfg), rank, world, m=c["m"], k=c["k"],
                                       lengths=c["lengths"], seq_len=cfg.seq_len, early_recv=c["early_recv"],
                                       weight_grad_store=c["weight_grad_store"])
        for _ in range(warmup):
            dist.barrier()
            run_step(sched, stages, x, y)
        timers = StepTimers(stages)
        for _ in range(repeats):
            dist.barrier()
            with timers.step():
                run_step(sched, stages, x, y)
        out.append(dict(c, rank=rank, **timers.summary()))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, BenchModel())
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--microbatches", type=int, default=2, help="m (default 2)")
    parser.add_argument("--chunks", type=int, default=4, help="k (default 4)")
    parser.add_argument("--partition", default="balanced", choices=["uniform", "balanced"],
                        help="chunk lengths (default balanced)")
    parser.add_argument("--seq-schedules", default=",".join(SEQ_SCHEDULES),
                        help=f"comma-separated, from {', '.join(SEQ_SCHEDULES)} (default all)")
    parser.add_argument("--early-recv", default="on", choices=["on", "off"],
                        help="receives posted ahead (default on, the schedules' default on gloo)")
    parser.add_argument("--weight-grad-store", default="on", choices=["on", "off"],
                        help="Seq1F1B-ZB's weight-gradient store; off = torch's split backward (default on)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per schedule (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per schedule (default 3)")


def main(args: argparse.Namespace) -> int:
    cfg = model_from_args(args)
    names = [s.strip() for s in args.seq_schedules.split(",") if s.strip()]
    bad = [s for s in names if s not in SEQ_SCHEDULES]
    if bad:
        raise SystemExit(f"--seq-schedules {bad}: choose from {', '.join(SEQ_SCHEDULES)}")
    lengths = partition_lengths(args.partition, cfg, args.chunks)
    configs = [dict(schedule=s, m=args.microbatches, k=args.chunks, lengths=lengths,
                    early_recv=args.early_recv == "on", weight_grad_store=args.weight_grad_store == "on")
               for s in names]
    load_before = load_average()
    results = run_ranks(breakdown_worker, args.ranks, cfg, configs, args.warmup, args.repeats, timeout_s=1800)
    rows = [r for per_rank in results for r in per_rank]
    rows.sort(key=lambda r: (names.index(r["schedule"]), r["rank"]))
    meta = dict(env_info(), load_before=load_before, load_after=load_average(), command="bench breakdown",
                model=str(cfg.model), seq_len=cfg.seq_len, early_recv=args.early_recv,
                weight_grad_store=args.weight_grad_store, warmup=args.warmup, repeats=args.repeats)
    print(f"load average before / after: {meta['load_before']} / {meta['load_after']}")
    print_table(rows, ["schedule", "rank", "step", "F", "B", "I", "W", "wait", "executor", "n_wait"],
                formats={k: ".3f" for k in ("step", *CATEGORIES)} | {"n_wait": ".0f"})
    write_results(out_dir(args), "breakdown", rows, meta)
    return 0


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"
