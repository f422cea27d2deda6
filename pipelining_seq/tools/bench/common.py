"""Shared pieces of the benchmarks: model, stages per schedule, environment, output."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import registry
from ...chunking import ChunkingConfig
from ...models import GPT, GPTConfig, cross_entropy_loss, split_stage
from ...models.gpt import flop_model
from ...partition import resolve_partition, uniform_partition
from ..simulate import MODEL_PRESETS, SEQ_SCHEDULES

__all__ = [
    "SEQ_SCHEDULES",
    "BenchModel",
    "TORCH_SCHEDULES",
    "add_model_arguments",
    "add_run_arguments",
    "build_schedule",
    "env_info",
    "make_batch",
    "make_model",
    "out_dir",
    "partition_lengths",
    "parse_schedules",
    "model_from_args",
    "print_table",
    "run_step",
    "write_results",
]

logger = logging.getLogger(__name__)



def _cpu_bench_gpt() -> GPTConfig:
    return dataclasses.replace(MODEL_PRESETS["cpu-bench"])  # a copy: GPTConfig is mutable


@dataclass(frozen=True)
class BenchModel:
    """What a benchmark runs: a GPT (float32; default the ``cpu-bench`` preset) and its sequence length."""

    model: GPTConfig = field(default_factory=_cpu_bench_gpt)
    """The model (its layers split evenly over the stages)."""
    seq_len: int = 2048
    """Tokens per sequence."""


def add_model_arguments(parser: argparse.ArgumentParser, defaults: BenchModel) -> None:
    g, m = parser.add_argument_group("model"), defaults.model
    g.add_argument("--layers", type=int, default=m.n_layers, help=f"blocks (default {m.n_layers})")
    g.add_argument("--dim", type=int, default=m.dim, help=f"hidden size (default {m.dim})")
    g.add_argument("--heads", type=int, default=m.n_heads, help=f"attention heads (default {m.n_heads})")
    g.add_argument("--seq-len", type=int, default=defaults.seq_len, help=f"sequence length (default {defaults.seq_len})")
    g.add_argument("--vocab", type=int, default=m.vocab_size, help=f"vocabulary (default {m.vocab_size})")
    g.add_argument("--attn-backend", default=m.attn_backend, choices=["auto", "blockwise", "sdpa"],
                   help="chunked attention backend for Seq1F1B (default auto = blockwise)")
    g.add_argument("--out", default=None, help="output folder (default $OUT, else outputs/bench)")


def model_from_args(args: argparse.Namespace) -> BenchModel:
    """The benchmark's GPT from the flags: MHA, GELU MLP (4 x dim)."""
    gpt = GPTConfig(vocab_size=args.vocab, n_layers=args.layers, dim=args.dim, n_heads=args.heads, mlp="gelu",
                    attn_backend=args.attn_backend)
    return BenchModel(model=gpt, seq_len=args.seq_len)


def make_model(cfg: BenchModel, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg.model)


def make_batch(cfg: BenchModel, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.model.vocab_size, (batch, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (batch, cfg.seq_len), generator=g)
    return x, y


# ------------------------------------------------------------------------- partitions
def partition_lengths(name: str, cfg: BenchModel, n_chunks: int, calibrated: dict | None = None) -> list[int]:
    """Chunk lengths for ``uniform``, ``balanced`` (FLOP model) or ``calibrated`` (``{k: lengths}``)."""
    if name not in ("uniform", "balanced", "calibrated"):
        raise ValueError(f"partition {name!r}: use uniform, balanced or calibrated")
    return resolve_partition(name, cfg.seq_len, n_chunks, flop_model=flop_model(cfg.model), calibrated=calibrated,
                             multiple_of=min(8, cfg.seq_len // n_chunks))


# ------------------------------------------------------------------------- schedules
TORCH_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "ZBVZeroBubble")
"""torch's schedules the multi-rank benchmarks compare by default."""


def add_run_arguments(parser: argparse.ArgumentParser, *, ranks: int, microbatches: str, chunks: str) -> None:
    """``--ranks``, ``--microbatches``, ``--chunks``, ``--schedules`` and ``--seq-schedules``."""
    parser.add_argument("--ranks", type=int, default=ranks, help=f"pipeline ranks (default {ranks})")
    parser.add_argument("--microbatches", default=microbatches, help=f"comma-separated m values (default {microbatches})")
    parser.add_argument("--chunks", default=chunks, help=f"comma-separated Seq1F1B k values (default {chunks})")
    parser.add_argument("--schedules", default=",".join(TORCH_SCHEDULES),
                        help=f"torch schedules to compare (default {','.join(TORCH_SCHEDULES)})")
    parser.add_argument("--seq-schedules", default=SEQ_SCHEDULES[0],
                        help="this package's schedules to run per k and partition, among "
                             f"{','.join(SEQ_SCHEDULES)} (default {SEQ_SCHEDULES[0]})")


def parse_schedules(text: str, flag: str, *, seq_chunks: bool) -> list[str]:
    """Canonical names of a comma-separated ``--flag`` list (any capitalisation); SystemExit naming the choices."""
    choices = [s.name for s in registry.SCHEDULES if s.seq_chunks == seq_chunks]
    names = []
    for n in (s.strip() for s in text.split(",")):
        if not n:
            continue
        try:
            info = registry.resolve_schedule(n)
        except ValueError:
            info = None
        if info is None or info.name not in choices:
            raise SystemExit(f"{flag}: unknown {n!r}; choose among {', '.join(choices)}")
        names.append(info.name)
    return names


def build_schedule(name: str, model: GPT, rank: int, world: int, *, m: int, k: int = 1,
                   lengths: Sequence[int] | None = None, seq_len: int | None = None,
                   stages_per_rank: int = 2, early_recv: bool | None = None,
                   weight_grad_store: bool = True) -> tuple[Any, list]:
    """A schedule of ``name`` for this rank and the stages it drives (:meth:`registry.ScheduleInfo.build`).

    The Seq1F1B schedules use :class:`SequencePipelineStage`\\ s; torch's schedules get plain
    ``PipelineStage``\\ s. Stages are placed as the registry places them (V placement for ZBV).
    """
    info = registry.resolve_schedule(name)
    v = info.fixed_stages_per_rank or stages_per_rank
    ids = info.rank_stages(pp=world, rank=rank, stages_per_rank=v)
    total = world * v
    modules = [split_stage(model, s, total) for s in ids]
    device = torch.device("cpu")
    options: dict[str, Any] = {}
    chunking = None
    if info.seq_chunks:
        # With explicit lengths the chunking is static: no per-step length exchange.
        part = list(lengths) if lengths is not None else ("uniform" if seq_len is None else uniform_partition(seq_len, k))
        chunking = ChunkingConfig(n_seq_chunks=k, seq_partition=part)
        if early_recv is not None:
            options["early_recv"] = early_recv
        if info.name == "Seq1F1BZeroBubble":
            options["weight_grad_store"] = weight_grad_store
    sched, stages = info.build(modules, ids, total, device, n_microbatches=m, loss_fn=cross_entropy_loss,
                               chunking=chunking, **options)
    return sched, stages


def run_step(sched: Any, stages: list, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step with the inputs/targets each rank needs."""
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)
    kwargs: dict[str, Any] = {}
    if last:
        kwargs["target"] = y
        kwargs["losses"] = []
    if first:
        sched.step(x, **kwargs)
    else:
        sched.step(**kwargs)
    for s in stages:
        for p in s.submod.parameters():
            p.grad = None


# ------------------------------------------------------------------------ environment
def env_info() -> dict:
    """Where and when a benchmark ran."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), cpu=cpu, cpu_count=os.cpu_count(), python=platform.python_version(),
        torch=torch.__version__, load_avg=[round(x, 2) for x in load],
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def out_dir(args: argparse.Namespace) -> str:
    path = args.out or os.environ.get("OUT") or os.path.join("outputs", "bench")
    os.makedirs(path, exist_ok=True)
    return path


def write_results(path: str, name: str, rows: list[dict], meta: dict, **extra: Any) -> tuple[str, str]:
    """``name.json`` (meta, rows and ``extra`` keys) and ``name.csv`` (rows) under ``path``."""
    jpath, cpath = os.path.join(path, f"{name}.json"), os.path.join(path, f"{name}.csv")
    with open(jpath, "w") as f:
        json.dump(dict(meta=meta, rows=rows, **extra), f, indent=1, default=str)
    keys: list[str] = []
    for r in rows:
        keys += [key for key in r if key not in keys]
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({key: json.dumps(v) if isinstance(v, (list, dict)) else v for key, v in r.items()})
    return jpath, cpath


def print_table(rows: list[dict], columns: Sequence[str], *, formats: dict | None = None) -> None:
    formats = formats or {}

    def fmt(col: str, v: Any) -> str:
        if v is None:
            return "-"
        if col in formats and isinstance(v, (int, float)):
            return format(v, formats[col])
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
