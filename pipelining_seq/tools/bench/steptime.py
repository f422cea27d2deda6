"""``bench time``: step time of Seq1F1B against torch's schedules on CPU ranks.

Every schedule of one micro-batch count is built in the same process group (same
weights, same batch) and they run interleaved, A B C A B C ..., so load changes hit
them alike; each step is bracketed by barriers and timed on rank 0. Figures are
medians after warm-up, reported as ratios: a torch schedule's step time over
Seq1F1B's with k chunks, and ``ScheduleSeq1F1B(k=1)`` over ``Schedule1F1B`` (the
cost of our machinery, which should be noise).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from .. import torch_schedules
from ..testing import run_ranks
from . import common
from .partition import calibrate

__all__ = ["add_arguments", "main", "time_worker"]

logger = logging.getLogger(__name__)

TORCH_SCHEDULES = common.TORCH_SCHEDULES


def time_worker(rank: int, world: int, cfg: common.BenchModel, groups: list[list[dict]], warmup: int,
                repeats: int) -> list[dict]:
    """Per group (one micro-batch count), build every schedule, then time them interleaved."""
    out = []
    for group in groups:
        m = group[0]["m"]
        x, y = common.make_batch(cfg, m)
        built = []
        for c in group:
            try:
                sched, stages = common.build_schedule(c["schedule"], common.make_model(cfg), rank, world, m=m, k=c["k"],
                                               lengths=c.get("lengths"), seq_len=cfg.seq_len,
                                               early_recv=c.get("early_recv"))
                built.append((c, sched, stages, None))
            except (ValueError, RuntimeError) as exc:
                built.append((c, None, None, f"{type(exc).__name__}: {exc}"))
        times: dict[int, list[float]] = {i: [] for i in range(len(built))}
        errors: dict[int, str] = {i: e for i, (_, _, _, e) in enumerate(built) if e}
        for rep in range(warmup + repeats):
            for i, (_c, sched, stages, _) in enumerate(built):
                if i in errors:
                    continue
                dist.barrier()
                t0 = time.perf_counter()
                try:
                    common.run_step(sched, stages, x, y)
                except Exception as exc:  # noqa: BLE001 - reported per schedule, like a build error
                    errors[i] = f"{type(exc).__name__}: {exc}"
                    raise
                dist.barrier()
                if rep >= warmup:
                    times[i].append(time.perf_counter() - t0)
        for i, (c, *_rest) in enumerate(built):
            out.append(dict(c, times=times[i], error=errors.get(i)))
    return out


def _ratio_rows(results: list[dict], ms: list[int], ks: list[int], partitions: list[str]) -> list[dict]:
    med = {}
    torch_names = set(torch_schedules.torch_schedule_names())
    for r in results:
        if r["times"]:
            med[(r["schedule"], r["m"], r["k"], r.get("partition"))] = statistics.median(r["times"])
    rows = []
    for m in ms:
        for k in ks:
            for part in partitions if k > 1 else [None]:
                seq = med.get(("Seq1F1B", m, k, part))
                row = dict(m=m, k=k, partition=part or "-", seq1f1b_s=seq)
                for name in dict.fromkeys([*TORCH_SCHEDULES, *(n for n, *_ in med if n in torch_names)]):
                    t = med.get((name, m, 1, None))
                    row[f"{name}/Seq1F1B"] = (t / seq) if (t and seq) else None
                for name in common.SEQ_SCHEDULES[1:]:
                    t = med.get((name, m, k, part))
                    if t:
                        row[f"{name}/Seq1F1B"] = (t / seq) if seq else None
                rows.append(row)
        t1, s1 = med.get(("1F1B", m, 1, None)), med.get(("Seq1F1B", m, 1, None))
        if t1 and s1:
            rows.append(dict(m=m, k="1 vs 1F1B", partition="-", seq1f1b_s=s1, overhead=s1 / t1 - 1))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].replace("``", "")
    common.add_model_arguments(parser, common.BenchModel())
    common.add_run_arguments(parser, ranks=2, microbatches="1,2,4", chunks="1,2,4,8")
    parser.add_argument("--partition", default="calibrated",
                        help="comma-separated Seq1F1B chunk lengths among uniform, balanced, calibrated (measured on "
                             "one process first); one Seq1F1B run per partition and k > 1 (default calibrated)")
    parser.add_argument("--early-recv", choices=["auto", "on", "off"], default="auto",
                        help="ScheduleSeq1F1B(early_recv=...): post each forward receive one unit ahead "
                             "(auto: on for gloo, the schedule's default)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per schedule (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per schedule (default 5)")
    parser.add_argument("--timeout", type=float, default=900, help="process-group timeout, seconds")


def main(args: argparse.Namespace) -> int:
    cfg = common.model_from_args(args)
    ms = [int(v) for v in args.microbatches.split(",")]
    ks = [int(v) for v in args.chunks.split(",")]
    torch_names = common.parse_schedules(args.schedules, "--schedules", seq_chunks=False)
    seq_names = common.parse_schedules(args.seq_schedules, "--seq-schedules", seq_chunks=True)
    for k in ks:
        if cfg.seq_len % k:
            raise SystemExit(f"--seq-len {cfg.seq_len} is not divisible by k={k}: change --chunks or --seq-len")
    if cfg.model.n_layers < 2 * args.ranks:
        raise SystemExit(f"--layers {cfg.model.n_layers} < 2 x --ranks: the two-stage-per-rank schedules need more layers")
    partitions = [p.strip() for p in args.partition.split(",") if p.strip()]
    for p in partitions:
        if p not in ("uniform", "balanced", "calibrated"):
            raise SystemExit(f"--partition: unknown {p!r}; use uniform, balanced, calibrated")
    meta = dict(env=common.env_info(), model=asdict(cfg), ranks=args.ranks, threads_per_rank=1,
                warmup=args.warmup, repeats=args.repeats, partition=args.partition, early_recv=args.early_recv)
    early = {"auto": None, "on": True, "off": False}[args.early_recv]
    calib = None
    if "calibrated" in partitions:
        torch.set_num_threads(1)
        calib = calibrate(cfg, [k for k in ks if k > 1], repeats=3, diagonal=True)
        meta["calibration"] = calib
        print(f"calibrated partitions: {calib['lengths']}")
    groups = []
    for m in ms:
        group = [dict(schedule="Seq1F1B", m=m, k=1, early_recv=early)] if 1 in ks else []
        group += [dict(schedule="Seq1F1B", m=m, k=k, partition=p, early_recv=early,
                       lengths=common.partition_lengths(p, cfg, k, calib["lengths"] if calib else None))
                  for k in ks if k > 1 for p in partitions]
        group += [dict(schedule=name, m=m, k=k, partition=p,
                       lengths=common.partition_lengths(p, cfg, k, calib["lengths"] if calib else None))
                  for name in seq_names if name != "Seq1F1B" for k in ks if k > 1 for p in partitions]
        group += [dict(schedule=name, m=m, k=1) for name in torch_names]
        groups.append(group)
    per_rank = run_ranks(time_worker, args.ranks, cfg, groups, args.warmup, args.repeats, timeout_s=args.timeout)
    results = per_rank[0]
    meta["env_after"] = common.env_info()
    for r in results:
        r["median_s"] = statistics.median(r["times"]) if r["times"] else None
    common.print_table(results, ["schedule", "m", "k", "lengths", "median_s"], formats={"median_s": ".4f"})
    for r in results:
        if r["error"]:
            print(f"{r['schedule']} m={r['m']}: {r['error']}")
    rows = _ratio_rows(results, ms, ks, partitions)
    cols = (["m", "k", "partition", "seq1f1b_s"] + [f"{n}/Seq1F1B" for n in torch_names]
            + [f"{n}/Seq1F1B" for n in seq_names if n != "Seq1F1B"] + ["overhead"])
    common.print_table(rows, cols, formats={c: ".3f" for c in cols[3:]})
    jpath, _ = common.write_results(common.out_dir(args), "time", rows, meta, runs=results)
    print(f"load average before/after: {meta['env']['load_avg']} / {meta['env_after']['load_avg']}; wrote {jpath}")
    return 0
