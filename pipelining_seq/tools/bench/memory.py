"""``bench memory``: peak activation memory per rank, measured and expected.

Each of ``--ranks`` CPU ranks runs every schedule (same model, same batch) for one
warm-up step, then one step inside :class:`~pipelining_seq.tools.memory.ActivationMemoryMeter`
(live bytes of tensors saved for backward plus the K/V cache, each storage counted
once). Ranks holding two stages (Interleaved1F1B, ZBV) are measured as a whole.

The expectation printed next to it walks the rank's action list with the measured
activation ``A`` of one micro-batch through the rank's stage(s): a forward adds its
share (``A·s_j/S`` for a chunk of ``s_j`` tokens), a full or weight backward removes
it, and under Seq1F1B the K/V gradients relayed to a micro-batch's earlier chunks are
added while its backward is in progress. For uniform chunks that is
``(p-r+k-1)/k·A`` on rank r against ``(p-r)·A`` for 1F1B.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, replace

import torch

from ... import registry
from ...models import GPTConfig, cross_entropy_loss, split_stage
from ..memory import ActivationMemoryMeter
from ..testing import run_ranks
from . import common

__all__ = ["add_arguments", "expected_peak", "main", "memory_worker"]

logger = logging.getLogger(__name__)

TORCH_SCHEDULES = common.TORCH_SCHEDULES
MIB = 2**20


def _stage_activation(cfg: common.BenchModel, stage_index: int, num_stages: int) -> tuple[int, int]:
    """(saved bytes, K/V bytes) of one micro-batch through one stage, measured alone."""
    part = split_stage(common.make_model(cfg), stage_index, num_stages)
    x, y = common.make_batch(cfg, 1)
    inp = x if stage_index == 0 else torch.randn(1, cfg.seq_len, cfg.model.dim, requires_grad=True)
    meter = ActivationMemoryMeter(modules=[part])
    with meter:
        out = part(inp)
        if stage_index == num_stages - 1:
            out = cross_entropy_loss(out, y)
    kv = 2 * len(part.layers) * cfg.seq_len * cfg.model.dim * 4
    return meter.peak_bytes, kv


def expected_peak(ops: list[registry.Action], stage_bytes: dict[int, tuple[int, int]],
                  lengths: list[int]) -> float:
    """Peak bytes of a rank's actions (see module docs)."""
    k = len(lengths)
    seq = sum(lengths)
    offsets = [sum(lengths[:j]) for j in range(k)]
    live = peak = 0.0
    relay: dict[tuple[int, int], float] = {}
    for kind, stage, unit in ops:
        act, kv = stage_bytes[stage]
        n, j = divmod(unit, k)
        share = act * lengths[j] / seq
        if kind == "F":
            live += share
        elif kind in ("B", "W"):
            live -= share
        if kind in ("B", "I") and k > 1:
            relay[(stage, n)] = kv * offsets[j] / seq
        peak = max(peak, live + sum(relay.values()))
    return peak


class _MergedKV:
    """The K/V caches of a rank's several stages, read as one by the meter."""

    def __init__(self, caches: list) -> None:
        self._caches = caches

    @property
    def _mbs(self) -> dict:
        return {(i, mb): layers for i, c in enumerate(self._caches) for mb, layers in c._mbs.items()}


def memory_worker(rank: int, world: int, cfg: common.BenchModel, configs: list[dict]) -> list[dict]:
    out = []
    for c in configs:
        m = c["m"]
        x, y = common.make_batch(cfg, m)
        mcfg = replace(cfg, model=replace(cfg.model, attn_backend=c.get("backend", cfg.model.attn_backend)))
        sched, stages = common.build_schedule(c["schedule"], common.make_model(mcfg), rank, world, m=m, k=c["k"],
                                              lengths=c.get("lengths"), seq_len=cfg.seq_len,
                                              weight_grad_store=c.get("weight_grad_store", True))
        common.run_step(sched, stages, x, y)  # warm-up: metadata inference and p2p set-up
        caches = [s.kv_cache for s in stages if hasattr(s, "kv_cache")]
        stores = [s.weight_grad_store for s in stages if getattr(s, "weight_grad_store", None) is not None]
        meter = ActivationMemoryMeter(modules=[s.submod for s in stages],
                                      kv_cache=caches[0] if len(caches) == 1 else _MergedKV(caches) if caches else None,
                                      weight_grads=stores)
        with meter:
            common.run_step(sched, stages, x, y)
        num_stages = stages[0].num_stages
        stage_bytes = {s.stage_index: _stage_activation(mcfg, s.stage_index, num_stages) for s in stages}
        # The schedule's own action list, from the registry.
        info = registry.resolve_schedule(c["schedule"])
        ops = info.orders(pp=world, n_microbatches=m, n_seq_chunks=c["k"] if info.seq_chunks else 1,
                          stages_per_rank=len(stages))[rank]
        lengths = list(c["lengths"]) if info.seq_chunks else [cfg.seq_len]
        out.append(dict(
            c, rank=rank, peak_mib=meter.peak_bytes / MIB, saved_mib=meter.peak_saved_bytes / MIB,
            kv_mib=meter.peak_kv_bytes / MIB,
            act_per_mb_mib=sum(a for a, _ in stage_bytes.values()) / MIB,
            expected_mib=expected_peak(ops, stage_bytes, lengths) / MIB,
        ))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].replace("``", "")
    common.add_model_arguments(parser, common.BenchModel(model=GPTConfig(n_layers=8, dim=64, n_heads=4, vocab_size=256), seq_len=512))
    common.add_run_arguments(parser, ranks=4, microbatches="4,8", chunks="2,4,8")
    parser.add_argument("--partitions", default="uniform,balanced", help="Seq1F1B partitions (default uniform,balanced)")
    parser.add_argument("--backends", default=None,
                        help="extra Seq1F1B attention backends to compare, e.g. sdpa (the concatenating design)")
    parser.add_argument("--timeout", type=float, default=900, help="process-group timeout, seconds")
    parser.add_argument("--png", help="draw measured (bars) and expected (ticks) peaks per rank for the largest m")


def draw_memory(summary: list[dict], path: str, *, title: str = "") -> None:
    """Grouped bars: one group per rank, one bar per schedule (largest m, one backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional dependency
        raise SystemExit("--png needs matplotlib: pip install 'pipelining_seq[viz]'") from exc
    m = max(r["m"] for r in summary)
    backend = summary[0]["backend"] if summary[0]["backend"] != "-" else None
    rows = [r for r in summary if r["m"] == m and r["backend"] in ("-", backend or "-", "auto", "blockwise")]
    ranks = len(rows[0]["peak_mib"])
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(11, 4.6))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        xs = [rank - 0.4 + width * (i + 0.5) for rank in range(ranks)]
        label = r["schedule"] if r["schedule"] != "Seq1F1B" else f"Seq1F1B k={r['k']} {r['partition']}"
        ax.bar(xs, r["peak_mib"], width=width * 0.95, color=cmap(i % 20), label=label)
        ax.scatter(xs, r["expected_mib"], marker="_", color="black", s=60, zorder=3)
    ax.set_xticks(range(ranks))
    ax.set_xticklabels([f"rank {r}" for r in range(ranks)])
    ax.set_ylabel("peak activation memory (MiB)")
    ax.set_title(title or f"measured peak per rank (bars) and expectation (black ticks), m={m}", fontsize=9)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _summary(rows: list[dict], world: int) -> list[dict]:
    base = {(r["m"], r["rank"]): r for r in rows if r["schedule"] == "1F1B"}
    out = []
    keys = []
    for r in rows:
        key = (r["schedule"], r["m"], r["k"], r.get("partition", "-"), r.get("backend", "-"))
        if key not in keys:
            keys.append(key)
    for key in keys:
        sched, m, k, part, backend = key
        per_rank = sorted((r for r in rows if (r["schedule"], r["m"], r["k"], r.get("partition", "-"),
                                               r.get("backend", "-")) == key), key=lambda r: r["rank"])
        row = dict(schedule=sched, m=m, k=k, partition=part, backend=backend,
                   peak_mib=[round(r["peak_mib"], 2) for r in per_rank],
                   expected_mib=[round(r["expected_mib"], 2) for r in per_rank])
        b0 = base.get((m, 0))
        if b0:
            row["rank0_vs_1F1B"] = per_rank[0]["peak_mib"] / b0["peak_mib"]
            row["rank0_expected_vs_1F1B"] = per_rank[0]["expected_mib"] / b0["expected_mib"]
            row["max_vs_1F1B_max"] = max(r["peak_mib"] for r in per_rank) / max(
                base[(m, r)]["peak_mib"] for r in range(world))
        out.append(row)
    return out


def main(args: argparse.Namespace) -> int:
    cfg = common.model_from_args(args)
    ms = [int(v) for v in args.microbatches.split(",")]
    ks = [int(v) for v in args.chunks.split(",")]
    parts = [p for p in args.partitions.split(",") if p]
    torch_names = common.parse_schedules(args.schedules, "--schedules", seq_chunks=False)
    seq_names = common.parse_schedules(args.seq_schedules, "--seq-schedules", seq_chunks=True)
    if "1F1B" not in torch_names:
        torch_names.insert(0, "1F1B")  # the ratios' reference
    if cfg.model.n_layers < 2 * args.ranks:
        raise SystemExit(f"--layers {cfg.model.n_layers} < 2 x --ranks: the two-stage-per-rank schedules need more layers")
    configs = []
    backends = [cfg.model.attn_backend] + [b for b in (args.backends or "").split(",") if b]
    for m in ms:
        configs += [dict(schedule=n, m=m, k=1) for n in torch_names]
        for k in ks:
            for p in parts:
                for b in backends:
                    configs.append(dict(schedule="Seq1F1B", m=m, k=k, partition=p, backend=b,
                                        lengths=common.partition_lengths(p, cfg, k)))
                configs += [dict(schedule=n, m=m, k=k, partition=p, lengths=common.partition_lengths(p, cfg, k))
                            for n in seq_names if n != "Seq1F1B"]
    meta = dict(env=common.env_info(), model=asdict(cfg), ranks=args.ranks)
    per_rank = run_ranks(memory_worker, args.ranks, cfg, configs, timeout_s=args.timeout)
    rows = [r for rank_rows in per_rank for r in rank_rows]
    summary = _summary(rows, args.ranks)
    cols = ["schedule", "m", "k", "partition", "backend", "peak_mib", "expected_mib", "rank0_vs_1F1B",
            "rank0_expected_vs_1F1B", "max_vs_1F1B_max"]
    common.print_table(summary, cols, formats={c: ".3f" for c in cols[-3:]})
    jpath, _ = common.write_results(common.out_dir(args), "memory", summary, meta, per_rank=rows)
    print(f"wrote {jpath}")
    if args.png:
        draw_memory(summary, args.png)
        print(f"wrote {args.png}")
    return 0
