"""``pipelining-seq bench``: Seq1F1B against torch's own schedules.

``bench memory``     peak activation memory per stage on 4 CPU ranks (measured + analytic)
``bench time``       step-time ratios on 2 CPU ranks, schedules interleaved A B A B
``bench partition``  per-chunk forward+backward time: uniform, FLOP-balanced, calibrated
``bench gpu``        one-GPU check: attention parity, real-size chunk times, stage memory
``bench documents``  Seq1F1B attention time per step with vs without document masks
``bench breakdown``  per-rank step time: compute, p2p waits, executor, weight pass
``bench emulate``    schedules on P ranks with each unit's compute a sleep of its FLOP time

Each prints one table and writes ``<name>.json`` and ``<name>.csv`` under ``--out``
(default ``$OUT`` if set, else ``outputs/bench``). Benchmark modules are imported only
when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["add_arguments", "main"]

_BENCHES = {
    "memory": ("pipelining_seq.tools.bench.memory", "peak activation memory per stage (4 CPU ranks)"),
    "time": ("pipelining_seq.tools.bench.steptime", "step-time ratios vs torch schedules (2 CPU ranks)"),
    "partition": ("pipelining_seq.tools.bench.partition", "per-chunk fwd+bwd time; linear_fit calibration"),
    "gpu": ("pipelining_seq.tools.bench.gpu", "one-GPU check (or --smoke on CPU)"),
    "documents": ("pipelining_seq.tools.bench.documents", "attention time with vs without document masks"),
    "breakdown": ("pipelining_seq.tools.bench.breakdown", "per-rank step time: compute, p2p waits, executor, W"),
    "emulate": ("pipelining_seq.tools.bench.emulate", "schedules with sleeping compute: measured vs simulated"),
}


def add_arguments(parser: argparse.ArgumentParser, *, command: str) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module, help_text) in _BENCHES.items():
        p = sub.add_parser(name, help=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_bench_main=mod.main)


def main(args: argparse.Namespace) -> int:
    return int(args._bench_main(args) or 0)
