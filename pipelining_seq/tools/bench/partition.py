"""``bench partition``: how equal are the chunks' forward+backward times?

On one process, the whole model runs one micro-batch in chunks the way a Seq1F1B
stage does (forwards in order, backwards in reverse), and every chunk's forward and
backward is timed. Partitions: ``uniform`` (equal tokens), ``balanced`` (the paper's
FLOP model) and ``calibrated`` (``linear_fit``: a few (length, end) chunk times are
profiled, the cost model's coefficients fitted, and the sequence re-cut). The
partitions run interleaved, repeat by repeat; the figures are max/mean of the per-chunk
medians, and the chunked total over the unchunked one (``total_over_full``: what cutting
the sequence costs in compute, which the smaller bubble must pay for). The JSON's
``partitions`` entries feed ``pipelining-seq simulate --times``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import asdict

import torch

from ...models import cross_entropy_loss
from ...models.gpt import flop_model as gpt_flop_model
from ..calibration import default_samples, fit_chunk_cost, linear_fit_partition, time_chunk, time_chunks
from . import common

__all__ = ["add_arguments", "main", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].replace("``", "")
    common.add_model_arguments(parser, common.BenchModel())
    parser.add_argument("--chunks", default="4", help="comma-separated k values (default 4)")
    parser.add_argument("--partitions", default="uniform,balanced,calibrated",
                        help="comma-separated among uniform, balanced, calibrated")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per partition (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--calib-repeats", type=int, default=3, help="repeats per calibration sample (default 3)")
    parser.add_argument("--fit", choices=["paper", "diagonal"], default="diagonal",
                        help="cost form: the paper's a1(sP-s²/2)+a2 s+b, or with an extra a3 s² "
                             "diagonal-block term (default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def calibrate(cfg: common.BenchModel, ks: list[int], *, repeats: int, diagonal: bool, multiple_of: int = 8,
              device: str = "cpu", model=None) -> dict:
    """Profile chunk costs, fit, and return the fitted partitions for every k."""
    model = model or common.make_model(cfg).to(device)
    x, y = (t.to(device) for t in common.make_batch(cfg, 1))
    samples = [
        (s, end, time_chunk(model, x, length=s, end=end, loss_fn=cross_entropy_loss, target=y, repeats=repeats))
        for s, end in default_samples(cfg.seq_len, multiple_of=multiple_of)
    ]
    cost = fit_chunk_cost(samples, diagonal=diagonal)
    fit_err = max(abs(cost.predict(s, e) / t - 1) for s, e, t in samples)
    return dict(
        samples=[dict(length=s, end=e, seconds=t) for s, e, t in samples],
        coefficients=asdict(cost), max_fit_error=fit_err,
        lengths={k: linear_fit_partition(cfg.seq_len, k, cost, multiple_of=multiple_of) for k in ks},
    )


def run(cfg: common.BenchModel, *, ks: list[int], partitions: list[str], repeats: int, warmup: int,
        calib_repeats: int, diagonal: bool) -> tuple[list[dict], dict, dict]:
    model = common.make_model(cfg)
    x, y = common.make_batch(cfg, 1)
    calib = None
    if "calibrated" in partitions:
        calib = calibrate(cfg, ks, repeats=calib_repeats, diagonal=diagonal, model=model)
    configs = [("full", 1, [cfg.seq_len])]
    for k in ks:
        for name in partitions:
            configs.append((name, k, common.partition_lengths(name, cfg, k, calib["lengths"] if calib else None)))
    fwd: dict[int, list] = {i: [] for i in range(len(configs))}
    bwd: dict[int, list] = {i: [] for i in range(len(configs))}
    for rep in range(warmup + repeats):
        for i, (_, _, lengths) in enumerate(configs):  # interleaved: A B C A B C ...
            f, b = time_chunks(model, x, lengths, loss_fn=cross_entropy_loss, target=y, repeats=1)
            if rep >= warmup:
                fwd[i].append(f)
                bwd[i].append(b)
    rows, entries = [], {}
    flop_model = gpt_flop_model(cfg.model)
    for i, (name, k, lengths) in enumerate(configs):
        f = [statistics.median(r[j] for r in fwd[i]) for j in range(k)]
        b = [statistics.median(r[j] for r in bwd[i]) for j in range(k)]
        tot = [a + c for a, c in zip(f, b)]
        ends = [sum(lengths[: j + 1]) for j in range(k)]
        flops = [flop_model.chunk_cost(s, e) for s, e in zip(lengths, ends)]
        rows.append(dict(
            partition=name, k=k, lengths=lengths, fwd_ms=[round(t * 1e3, 2) for t in f],
            bwd_ms=[round(t * 1e3, 2) for t in b], chunk_ms=[round(t * 1e3, 2) for t in tot],
            total_ms=sum(tot) * 1e3, max_over_mean=max(tot) / (sum(tot) / k),
            flop_max_over_mean=max(flops) / (sum(flops) / k),
        ))
        # The chunked run's whole cost over the unchunked one ("full", always first): what
        # cutting the sequence costs before any bubble is saved.
        rows[-1]["total_over_full"] = rows[-1]["total_ms"] / rows[0]["total_ms"]
        entries[name if name == "full" else f"{name}@{k}"] = dict(lengths=lengths, fwd=f, bwd=b)
    return rows, entries, calib or {}


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    cfg = common.model_from_args(args)
    ks = [int(k) for k in args.chunks.split(",")]
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    for p in partitions:
        if p not in ("uniform", "balanced", "calibrated"):
            raise SystemExit(f"--partitions: unknown {p!r}; use uniform, balanced, calibrated")
    for k in ks:
        if cfg.seq_len % k:
            raise SystemExit(f"--seq-len {cfg.seq_len} is not divisible by k={k} (uniform chunks): change --chunks")
    meta = dict(env=common.env_info(), model=asdict(cfg), threads=args.threads, repeats=args.repeats, fit=args.fit)
    rows, entries, calib = run(cfg, ks=ks, partitions=partitions, repeats=args.repeats, warmup=args.warmup,
                               calib_repeats=args.calib_repeats, diagonal=args.fit == "diagonal")
    if calib:
        print(f"calibration ({args.fit} form): {calib['coefficients']}, max fit error {calib['max_fit_error']:.1%}")
    common.print_table(rows, ["partition", "k", "lengths", "chunk_ms", "total_ms", "total_over_full", "max_over_mean",
                              "flop_max_over_mean"],
                       formats={"total_ms": ".1f", "total_over_full": ".3f", "max_over_mean": ".3f",
                                "flop_max_over_mean": ".3f"})
    meta["calibration"] = calib
    path = common.out_dir(args)
    jpath, _ = common.write_results(path, "partition", rows, meta, partitions=entries, scope="model")
    # simulate --times reads the top-level "partitions" mapping.
    print(f"wrote {jpath} (use with: pipelining-seq simulate --times {jpath} --chunks {ks[0]} "
          f"--partition calibrated)")
    return 0
