"""A pipeline-schedule simulator: play action lists through their dependencies.

Every rank runs its compute actions in the order its schedule lists them; an action
starts when the rank is free and its inputs exist:

* ``F(s, u)`` after ``F(s-1, u)`` (the activation) and, for chunk ``j > 0`` of a
  micro-batch, ``F(s, u-1)`` (the K/V of the earlier chunk);
* ``B(s, u)`` / ``I(s, u)`` after the input-gradient of ``(s+1, u)``, after ``F(s, u)``
  and, for chunk ``j < k-1``, after the input-gradient of ``(s, u+1)`` (the K/V
  gradients relayed from the later chunk);
* ``W(s, u)`` after ``I(s, u)``.

Every schedule's lists come from :mod:`pipelining_seq.registry` (torch's are read back
from their own IR there).
Durations come from a :class:`CostModel`: equal-cost units (backward twice forward),
the FLOP model of :mod:`pipelining_seq.flops` for a preset model, or measured
per-chunk times.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import registry
from ..models.gpt import GPTConfig, flop_model
from ..partition import resolve_partition
from ..registry import Action
from . import torch_schedules

__all__ = [
    "CostModel",
    "MODEL_PRESETS",
    "Op",
    "ScheduleOps",
    "SimResult",
    "add_arguments",
    "build_schedule_ops",
    "draw_timeline",
    "equal_costs",
    "flop_costs",
    "main",
    "measured_costs",
    "schedule_names",
    "simulate",
]

logger = logging.getLogger(__name__)

SEQ_SCHEDULES = tuple(s.name for s in registry.SCHEDULES if s.seq_chunks)
"""Schedules that take sequence chunks (``--chunks``)."""
SEQ1F1B = SEQ_SCHEDULES[0]
"""The reference schedule of the comparisons."""


def _paper_model(layers: int, hidden: int, heads: int) -> GPTConfig:
    # The paper's GPTs (its exp.sh): MHA, a non-gated 4H MLP, GPT-2 BPE padded to 51200.
    return GPTConfig(n_layers=layers, dim=hidden, n_heads=heads, ffn_dim=4 * hidden, mlp="gelu", vocab_size=51200)


MODEL_PRESETS: dict[str, GPTConfig] = {
    "2.7b": _paper_model(32, 2560, 32),
    "7b": _paper_model(32, 4096, 32),
    "13b": _paper_model(40, 5120, 40),
    "30b": _paper_model(64, 6144, 64),
    # The CPU step-time benchmark's GPT (attention is most of its cost).
    "cpu-bench": GPTConfig(n_layers=4, dim=128, n_heads=4, ffn_dim=512, mlp="gelu", vocab_size=256),
}
"""Models ``simulate --model`` (and the benchmarks' defaults) know by name."""


# ----------------------------------------------------------------------------- plans
Op = Action
"""One compute action (:class:`pipelining_seq.registry.Action`): ``kind`` of ``unit`` on ``stage``."""


@dataclass
class ScheduleOps:
    """Every rank's action list for one schedule."""

    name: str
    num_ranks: int
    num_stages: int
    n_microbatches: int
    n_chunks: int
    ops: dict[int, list[Op]]

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.num_ranks


def schedule_names() -> list[str]:
    return [*SEQ_SCHEDULES, *torch_schedules.torch_schedule_names()]


def build_schedule_ops(name: str, *, pp: int, microbatches: int, chunks: int = 1, stages_per_rank: int = 2) -> ScheduleOps:
    """The action lists of schedule ``name`` (any capitalisation), from the registry."""
    if pp < 1 or microbatches < 1 or chunks < 1:
        raise ValueError(f"pp={pp}, microbatches={microbatches}, chunks={chunks}: all must be >= 1")
    info = _schedule(name)
    v = info.fixed_stages_per_rank or stages_per_rank
    # Seq1F1B's order is also played with fewer units than ranks (its closed form holds
    # there), although ScheduleSeq1F1B refuses to run it.
    orders = info.orders(pp=pp, n_microbatches=microbatches, n_seq_chunks=chunks, stages_per_rank=v,
                         check=info.name != SEQ1F1B)
    return ScheduleOps(info.name, pp, pp * v, microbatches, chunks, orders)


def _schedule(name: str) -> registry.ScheduleInfo:
    try:
        info = registry.resolve_schedule(name)  # any capitalisation
    except ValueError:
        info = None
    if info is None or info.name not in schedule_names():
        raise ValueError(f"--schedule {name!r}: choose from {', '.join(schedule_names())}")
    return info


# ------------------------------------------------------------------------ cost models
@dataclass
class CostModel:
    """Durations and activation sizes of one stage's work on one chunk.

    ``fwd[s][j]`` / ``bwd[s][j]``: time of chunk ``j`` on stage ``s``; a split backward
    spends ``w[s][j]`` in ``W`` (``w_fraction`` of ``bwd`` when ``w`` is None) and the rest
    in ``I``. ``act[s][j]`` is the
    activation memory chunk ``j`` keeps on stage ``s``, in micro-batches of one rank's
    activations (1.0 = a whole micro-batch through all the rank's layers).
    """

    fwd: list[list[float]]
    """Forward time, ``[stage][chunk]``."""
    bwd: list[list[float]]
    """Full backward time, ``[stage][chunk]``."""
    act: list[list[float]]
    """Activations kept, ``[stage][chunk]``, in micro-batches of one rank."""
    lengths: list[int] = field(default_factory=list)
    """Chunk lengths (tokens) behind the costs."""
    w_fraction: float = 0.5
    """Share of a split backward spent in W when ``w`` is None."""
    w: list[list[float]] | None = None
    """W time of a split backward, ``[stage][chunk]`` (the FLOP model's weight gradients)."""
    source: str = "equal"
    """Which model produced the costs: equal, flop or measured."""

    def duration(self, op: Op) -> float:
        j = op.unit % len(self.fwd[op.stage])
        if op.kind == "F":
            return self.fwd[op.stage][j]
        if op.kind == "B":
            return self.bwd[op.stage][j]
        return self.split_backward(op.stage, j)[0 if op.kind == "I" else 1]

    def split_backward(self, stage: int, j: int) -> tuple[float, float]:
        """(I, W) time of chunk ``j`` on ``stage``."""
        b = self.bwd[stage][j]
        w = b * self.w_fraction if self.w is None else self.w[stage][j]
        return b - w, w


def _per_stage(values: Sequence[float], num_stages: int, scale: float) -> list[list[float]]:
    return [[v * scale for v in values] for _ in range(num_stages)]


def equal_costs(plan: ScheduleOps, *, lengths: Sequence[int] | None = None, bwd_ratio: float = 2.0) -> CostModel:
    """Every unit costs the same: a micro-batch's forward through one rank is 1."""
    k, v = plan.n_chunks, plan.stages_per_rank
    lengths = list(lengths or [1] * k)
    act = [[s / sum(lengths) / v for s in lengths] for _ in range(plan.num_stages)]
    f = 1.0 / (k * v)
    return CostModel(
        _per_stage([f] * k, plan.num_stages, 1.0), _per_stage([f * bwd_ratio] * k, plan.num_stages, 1.0),
        act, lengths, source="equal",
    )


def flop_costs(plan: ScheduleOps, model: GPTConfig, lengths: Sequence[int], *, bwd_ratio: float = 2.0) -> CostModel:
    """Forward FLOPs per stage and chunk from :class:`pipelining_seq.flops.FlopModel`:
    the model's layers split over the stages as the launcher splits them, the output
    head on the last stage. Backward is ``bwd_ratio`` times forward; a split backward's W
    is the weight-gradient FLOPs (:meth:`~pipelining_seq.flops.FlopModel.stage_weight_grad_costs`),
    I the rest. Units: GFLOP.
    """
    S = plan.num_stages
    if model.n_layers < S:
        raise ValueError(f"{model.n_layers} layers cannot fill {S} stages: lower --pp or --stages-per-rank")
    flops = flop_model(model)
    fwd = [[c / 1e9 for c in row] for row in flops.stage_costs(list(lengths), S)]
    bwd = [[c * bwd_ratio for c in row] for row in fwd]
    w = [[min(c / 1e9, b) for c, b in zip(row, brow)]
         for row, brow in zip(flops.stage_weight_grad_costs(list(lengths), S), bwd)]
    v = plan.stages_per_rank
    act = [[s / sum(lengths) / v for s in lengths] for _ in range(S)]
    return CostModel(fwd, bwd, act, list(lengths), w=w, source="flop")


def measured_costs(plan: ScheduleOps, entry: dict, *, scope: str = "stage", model: GPTConfig | None = None) -> CostModel:
    """Measured per-chunk times (``{"lengths", "fwd", "bwd"}``, seconds).

    ``scope="stage"``: what was measured is one rank's share (``bench gpu`` times a
    stack of layers), and with several stages per rank each stage runs
    ``1/stages_per_rank`` of it. ``scope="model"``: the whole model was measured
    (``bench partition``) and every stage runs ``1/num_stages`` of it. A split
    backward's W is the measured model's weight-gradient share of each chunk's backward
    under the FLOP model (half when ``model`` is None: nothing says more).
    """
    if scope not in ("stage", "model"):
        raise ValueError(f"scope={scope!r}: use 'stage' or 'model'")
    lengths, fwd, bwd = list(entry["lengths"]), list(entry["fwd"]), list(entry["bwd"])
    if not (len(lengths) == len(fwd) == len(bwd) == plan.n_chunks):
        raise ValueError(
            f"measured times have {len(lengths)} chunks but the {plan.name} plan has {plan.n_chunks}: "
            "pass --chunks equal to the benchmark's"
        )
    v = plan.stages_per_rank
    share = 1 / v if scope == "stage" else 1 / plan.num_stages
    act = [[s / sum(lengths) / v for s in lengths] for _ in range(plan.num_stages)]
    bwd_stages = _per_stage(bwd, plan.num_stages, share)
    w = None
    if model is not None:
        fm = flop_model(model)
        w_share = [wf / (2 * f) for wf, f in zip(fm.stage_weight_grad_costs(lengths, 1)[0], fm.stage_costs(lengths, 1)[0])]
        w = [[b * r for b, r in zip(row, w_share)] for row in bwd_stages]
    return CostModel(_per_stage(fwd, plan.num_stages, share), bwd_stages, act, lengths, w=w, source="measured")


# ------------------------------------------------------------------------- simulation
@dataclass
class SimResult:
    """A played schedule."""

    plan: ScheduleOps
    cost: CostModel
    timeline: dict[int, list[tuple[Op, float, float]]]
    makespan: float
    busy: list[float]
    peak_live_units: list[int]
    peak_activation: list[float]
    label: str = ""
    """Display name (defaults to the schedule's)."""

    @property
    def name(self) -> str:
        return self.label or self.plan.name

    @property
    def bubble(self) -> float:
        """Idle share of all ranks' time: ``1 - busy / (ranks * makespan)``."""
        return 1.0 - sum(self.busy) / (self.plan.num_ranks * self.makespan)

    def summary(self) -> dict:
        p = self.plan
        return dict(
            schedule=self.name, pp=p.num_ranks, stages=p.num_stages, microbatches=p.n_microbatches,
            chunks=p.n_chunks, lengths=self.cost.lengths, cost=self.cost.source,
            makespan=self.makespan, bubble=self.bubble, peak_live_units=self.peak_live_units,
            peak_activation=[round(a, 4) for a in self.peak_activation],
        )


def _deps(op: Op, k: int, last_stage: int) -> list[tuple[int, str, int]]:
    s, u, j = op.stage, op.unit, op.unit % k
    if op.kind == "F":
        out = [(s - 1, "F", u)] if s > 0 else []
        return out + ([(s, "F", u - 1)] if j > 0 else [])
    if op.kind == "W":
        return [(s, "G", u)]
    out = [(s, "F", u)]
    if s < last_stage:
        out.append((s + 1, "G", u))
    if j < k - 1:
        out.append((s, "G", u + 1))
    return out


def simulate(plan: ScheduleOps, cost: CostModel, *, comm: float = 0.0, recv_latency: float = 0.0) -> SimResult:
    """Play ``plan`` with durations from ``cost``.

    ``comm`` delays every cross-rank edge (transfer time); ``recv_latency`` is what a
    rank pays after it becomes free before an action with a cross-rank input can
    start, even when the data was sent long before (a receive posted late, e.g. gloo
    on oversubscribed cores).
    """
    k, last = plan.n_chunks, plan.num_stages - 1
    stage_rank = {op.stage: r for r, ops in plan.ops.items() for op in ops}
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * plan.num_ranks
    ptr = [0] * plan.num_ranks
    timeline: dict[int, list[tuple[Op, float, float]]] = {r: [] for r in plan.ops}
    remaining = sum(len(v) for v in plan.ops.values())
    while remaining:
        progressed = False
        for r, ops in plan.ops.items():
            while ptr[r] < len(ops):
                op = ops[ptr[r]]
                deps = _deps(op, k, last)
                if any(d not in done for d in deps):
                    break
                remote = [d for d in deps if stage_rank.get(d[0], r) != r]
                ready = max(
                    [free[r] + (recv_latency if remote else 0.0)]
                    + [done[d] + (comm if d in remote else 0.0) for d in deps]
                )
                end = ready + cost.duration(op)
                timeline[r].append((op, ready, end))
                free[r] = end
                if op.kind in ("F", "W"):
                    done[(op.stage, op.kind, op.unit)] = end
                if op.kind in ("B", "I"):
                    done[(op.stage, "G", op.unit)] = end
                ptr[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = [str(ops[ptr[r]]) for r, ops in plan.ops.items() if ptr[r] < len(ops)]
            raise RuntimeError(f"{plan.name}: schedule deadlocks; blocked actions: {blocked}")
    busy = [sum(e - s for _, s, e in timeline[r]) for r in sorted(timeline)]
    live_units, live_act = [], []
    for r in sorted(plan.ops):
        n = peak_n = 0
        a = peak_a = 0.0
        for op in plan.ops[r]:
            j = op.unit % k
            if op.kind == "F":
                n, a = n + 1, a + cost.act[op.stage][j]
            elif op.kind in ("B", "W"):  # activations live until the weight gradient
                n, a = n - 1, a - cost.act[op.stage][j]
            peak_n, peak_a = max(peak_n, n), max(peak_a, a)
        live_units.append(peak_n)
        live_act.append(peak_a)
    makespan = max(free)
    return SimResult(plan, cost, timeline, makespan, busy, live_units, live_act)


_CLOSED_FORM = (SEQ1F1B, "1F1B", "GPipe")
"""Schedules whose equal-cost bubble is :func:`closed_form_bubble`."""


def closed_form_bubble(pp: int, microbatches: int, chunks: int = 1) -> float:
    """Equal-cost bubble of 1F1B (``chunks=1``) and Seq1F1B: ``(p-1)/(mk+p-1)``."""
    return (pp - 1) / (microbatches * chunks + pp - 1)


# ---------------------------------------------------------------------------- drawing
def draw_timeline(results: Sequence[SimResult], path: str, *, title: str | None = None) -> None:
    """One panel per schedule, one row per rank, shared time axis; F light, B dark."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:  # optional dependency
        raise SystemExit(
            "--png needs matplotlib: pip install 'pipelining_seq[viz]' (or drop --png)"
        ) from exc
    cmap = plt.get_cmap("tab10")
    heights = [r.plan.num_ranks * 0.42 + 0.7 for r in results]
    fig, axes = plt.subplots(len(results), 1, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, sharex=True)
    span = max(r.makespan for r in results)
    for ax, res in zip(axes[:, 0], results):
        k = res.plan.n_chunks
        for r, items in res.timeline.items():
            for op, start, end in items:
                colour = cmap((op.unit // k) % 10)
                alpha = {"F": 0.45, "B": 1.0, "I": 0.8, "W": 0.6}[op.kind]
                ax.barh(r, end - start, left=start, height=0.8, color=colour, alpha=alpha,
                        edgecolor="black", linewidth=0.3, hatch="//" if op.kind == "W" else None)
                label = f"{op.unit // k}.{op.unit % k}" if k > 1 else str(op.unit)
                if res.plan.stages_per_rank > 1:
                    label = f"s{op.stage}:{label}"
                if (end - start) > span * 0.012 * len(label) / 2:
                    ax.text((start + end) / 2, r, label, ha="center", va="center", fontsize=6)
        ax.set_yticks(range(res.plan.num_ranks))
        ax.set_yticklabels([f"rank {r}" for r in range(res.plan.num_ranks)], fontsize=7)
        ax.invert_yaxis()
        lens = "" if k == 1 else (", equal-cost chunks" if res.cost.source == "equal" else f", chunks {res.cost.lengths}")
        ax.set_title(
            f"{res.name}: p={res.plan.num_ranks}, m={res.plan.n_microbatches}, k={k}{lens}; "
            f"makespan {res.makespan:.3g}, bubble {res.bubble:.1%}", fontsize=8, loc="left",
        )
        ax.tick_params(axis="x", labelsize=7)
    handles = [Patch(facecolor="grey", alpha=0.45, label="forward"), Patch(facecolor="grey", label="backward")]
    fig.legend(handles=handles, fontsize=7, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel(f"time ({results[0].cost.source} cost model)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / sum(heights)))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------ paper check
# §5.3 of the reference: 7B on 32 A100s, TFLOPS per GPU (TP/PP split not stated).
PAPER_BASELINES = ("1F1B", "Interleaved1F1B")
"""The paper's baselines, in its table's order."""
PAPER_7B = {
    (32768, 8): {"1F1B": 99.67, "Interleaved1F1B": 109.55, "Seq1F1B": 110.62},
    (32768, 16): {"1F1B": 114.45, "Interleaved1F1B": 116.46, "Seq1F1B": 115.34},
    (65536, 8): {"1F1B": 107.49, "Interleaved1F1B": 119.96, "Seq1F1B": 124.62},
    (65536, 16): {"1F1B": 123.95, "Interleaved1F1B": 128.70, "Seq1F1B": 123.05},
}


def paper_comparison(*, pps: Sequence[int] = (4, 8), chunks: int = 4, bwd_ratio: float = 2.0,
                     comm: float = 0.0, recv_latency: float = 0.0) -> list[dict]:
    """Simulated Seq1F1B/1F1B and Seq1F1B/1F1B-interleaved for the paper's 7B runs."""
    model = MODEL_PRESETS["7b"]
    rows = []
    for (seq, m), measured in PAPER_7B.items():
        for pp in pps:
            lengths = resolve_partition("balanced", seq, chunks, flop_model=flop_model(model), multiple_of=8)
            seq_plan = build_schedule_ops(SEQ1F1B, pp=pp, microbatches=m, chunks=chunks)
            seq_res = simulate(seq_plan, flop_costs(seq_plan, model, lengths, bwd_ratio=bwd_ratio), comm=comm,
                               recv_latency=recv_latency)
            times = {}
            for name in PAPER_BASELINES:
                plan = build_schedule_ops(name, pp=pp, microbatches=m)
                times[name] = simulate(plan, flop_costs(plan, model, [seq], bwd_ratio=bwd_ratio), comm=comm,
                                       recv_latency=recv_latency)
            rows.append(dict(
                seq_len=seq, microbatches=m, pp=pp, chunks=chunks, lengths=lengths,
                bubble_1f1b=times[PAPER_BASELINES[0]].bubble, bubble_i1f1b=times[PAPER_BASELINES[1]].bubble,
                bubble_seq=seq_res.bubble,
                sim_vs_1f1b=times[PAPER_BASELINES[0]].makespan / seq_res.makespan,
                sim_vs_i1f1b=times[PAPER_BASELINES[1]].makespan / seq_res.makespan,
                paper_vs_1f1b=measured[SEQ1F1B] / measured[PAPER_BASELINES[0]],
                paper_vs_i1f1b=measured[SEQ1F1B] / measured[PAPER_BASELINES[1]],
            ))
    return rows


# -------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, *, command: str) -> None:
    parser.description = "Play pipeline schedules through a cost model; print bubble and live units."
    parser.add_argument("--pp", type=int, default=4, help="pipeline ranks (default 4)")
    parser.add_argument("--microbatches", "-m", type=int, default=8, help="micro-batches per step (default 8)")
    parser.add_argument("--chunks", "-k", type=int, default=4, help="Seq1F1B sequence chunks (default 4)")
    parser.add_argument("--schedule", default="Seq1F1B,1F1B",
                        help=f"comma-separated schedules among {', '.join(schedule_names())}, or 'all'")
    parser.add_argument("--stages-per-rank", type=int, default=2,
                        help="virtual stages per rank for Interleaved1F1B/InterleavedZeroBubble (default 2)")
    parser.add_argument("--partition", nargs="+", default=["uniform"],
                        help="Seq1F1B chunk lengths, one simulated run each: uniform, balanced (needs --model), "
                             "or comma-separated lengths; with --times, the benchmark entries to use "
                             "(uniform, balanced, calibrated)")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), help="FLOP cost model for this preset")
    parser.add_argument("--seq-len", type=int, help="sequence length for --model (default 32768)")
    parser.add_argument("--times", help="JSON written by 'bench partition' or 'bench gpu': measured per-chunk times")
    parser.add_argument("--bwd-ratio", type=float, default=2.0, help="backward/forward time ratio (default 2)")
    parser.add_argument("--comm", type=float, default=0.0, help="delay added to every cross-rank dependency")
    parser.add_argument("--recv-latency", type=float, default=0.0,
                        help="time a rank spends receiving a cross-rank input after it is free (late-posted receive)")
    parser.add_argument("--png", help="draw the timelines into this PNG (needs matplotlib)")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--paper", action="store_true",
                        help="reproduce the paper's 7B comparison (32k/64k, m=8/16) and exit")


def _lengths_for(args: argparse.Namespace, part: str, seq_len: int) -> list[int]:
    k = args.chunks
    if part == "uniform" and seq_len % k:
        return [1] * k  # equal-cost units: the lengths only weight the activation count
    if part in ("uniform", "balanced"):
        fm = flop_model(MODEL_PRESETS[args.model]) if args.model else None
        return resolve_partition(part, seq_len, k, flop_model=fm, multiple_of=8)
    try:
        lengths = [int(x) for x in part.split(",")]
    except ValueError:
        raise SystemExit(f"--partition {part!r}: use uniform, balanced, calibrated or comma-separated lengths") from None
    if len(lengths) != k:
        raise SystemExit(f"--partition {part} gives {len(lengths)} lengths but --chunks is {k}")
    return lengths


def _times_model(times: dict) -> GPTConfig | None:
    """The model a ``bench partition`` / ``bench gpu`` JSON timed (for W's FLOP share)."""
    found = times.get("meta", {}).get("model", {}).get("model") or times.get("report", {}).get("config", {}).get("model")
    return GPTConfig(**found) if isinstance(found, dict) else None


def _costs(args: argparse.Namespace, plan: ScheduleOps, part: str, times: dict | None) -> CostModel:
    if times is not None:
        entries = times.get("partitions", {})
        keys = ["full"] if plan.n_chunks == 1 and plan.name not in SEQ_SCHEDULES else [f"{part}@{plan.n_chunks}", part]
        for key in keys:
            if key in entries:
                return measured_costs(plan, entries[key], scope=times.get("scope", "stage"),
                                      model=_times_model(times) or (MODEL_PRESETS[args.model] if args.model else None))
        raise SystemExit(f"--times file has no {' or '.join(repr(k) for k in keys)} entry (has {sorted(entries)})")
    if args.model:
        seq_len = args.seq_len or 32768
        lengths = _lengths_for(args, part, seq_len) if plan.n_chunks > 1 else [seq_len]
        return flop_costs(plan, MODEL_PRESETS[args.model], lengths, bwd_ratio=args.bwd_ratio)
    # Equal-cost units: explicit chunk lengths only weight the activation count.
    if plan.n_chunks > 1 and part != "uniform":
        return equal_costs(plan, lengths=_lengths_for(args, part, 0), bwd_ratio=args.bwd_ratio)
    return equal_costs(plan, bwd_ratio=args.bwd_ratio)


def _print_paper(rows: list[dict]) -> None:
    print(f"{'S':>6} {'m':>3} {'pp':>3} | {'bubble 1F1B':>11} {'1F1B-I':>7} {'Seq1F1B':>8} | "
          f"{'sim Seq/1F1B':>12} {'paper':>6} {'paper/sim':>9} | {'sim Seq/1F1B-I':>14} {'paper':>6} {'paper/sim':>9}")
    for r in rows:
        print(f"{r['seq_len']:>6} {r['microbatches']:>3} {r['pp']:>3} | {r['bubble_1f1b']:>11.3f} "
              f"{r['bubble_i1f1b']:>7.3f} {r['bubble_seq']:>8.3f} | {r['sim_vs_1f1b']:>12.3f} "
              f"{r['paper_vs_1f1b']:>6.3f} {r['paper_vs_1f1b'] / r['sim_vs_1f1b']:>9.3f} | "
              f"{r['sim_vs_i1f1b']:>14.3f} {r['paper_vs_i1f1b']:>6.3f} {r['paper_vs_i1f1b'] / r['sim_vs_i1f1b']:>9.3f}")
    # Throughput gain from m=8 to m=16 per schedule: the bubble's share, paper vs simulation.
    print(f"\n{'S':>6} {'pp':>3} | m=16 / m=8 throughput: {'1F1B sim':>8} {'paper':>6} | {'1F1B-I sim':>10} "
          f"{'paper':>6} | {'Seq1F1B sim':>11} {'paper':>6}")
    for seq in sorted({r["seq_len"] for r in rows}):
        for pp in sorted({r["pp"] for r in rows}):
            r8, r16 = ([r for r in rows if r["seq_len"] == seq and r["pp"] == pp and r["microbatches"] == m][0]
                       for m in (8, 16))
            paper8, paper16 = PAPER_7B[(seq, 8)], PAPER_7B[(seq, 16)]
            cells = []
            for key, name in (("bubble_1f1b", "1F1B"), ("bubble_i1f1b", "Interleaved1F1B"), ("bubble_seq", "Seq1F1B")):
                cells.append(((1 - r16[key]) / (1 - r8[key]), paper16[name] / paper8[name]))
            print(f"{seq:>6} {pp:>3} | {'':>22} {cells[0][0]:>8.3f} {cells[0][1]:>6.3f} | {cells[1][0]:>10.3f} "
                  f"{cells[1][1]:>6.3f} | {cells[2][0]:>11.3f} {cells[2][1]:>6.3f}")


def _arg_problems(args: argparse.Namespace) -> list[str]:
    """Bad sizes and unusable files, before anything is simulated or drawn."""
    errors = [f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1"
              for name in ("pp", "microbatches", "chunks", "stages_per_rank") if getattr(args, name) < 1]
    for name in ("bwd_ratio", "comm", "recv_latency"):
        if getattr(args, name) < 0:
            errors.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if args.times and not os.path.isfile(args.times):
        errors.append(f"--times {args.times}: no such file (write one with `pipelining-seq bench partition`)")
    for flag in ("png", "json"):
        out = getattr(args, flag)
        folder = os.path.dirname(os.path.abspath(out)) if out else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            errors.append(f"--{flag} {out}: folder {folder} does not exist or is not writable")
    return errors


def main(args: argparse.Namespace) -> int:
    problems = _arg_problems(args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.paper:
        rows = paper_comparison(pps=(4, 8), chunks=args.chunks, bwd_ratio=args.bwd_ratio, comm=args.comm,
                                recv_latency=args.recv_latency)
        _print_paper(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    for part in args.partition:
        if part == "calibrated" and not args.times:
            raise SystemExit("--partition calibrated needs --times (a 'bench partition' JSON with calibrated chunks)")
        if part == "balanced" and not (args.model or args.times):
            raise SystemExit("--partition balanced needs --model (the FLOP model it balances) or --times")
    names = schedule_names() if args.schedule.lower() == "all" else [s.strip() for s in args.schedule.split(",") if s.strip()]
    try:
        names = [_schedule(n).name for n in names]  # canonical spelling, any capitalisation
    except ValueError as e:
        raise SystemExit(f"{e} or 'all'") from None
    times = None
    if args.times:
        with open(args.times) as f:
            times = json.load(f)
    results: list[SimResult] = []
    for name in names:
        k = args.chunks if name in SEQ_SCHEDULES else 1
        try:
            plan = build_schedule_ops(name, pp=args.pp, microbatches=args.microbatches, chunks=k,
                              stages_per_rank=args.stages_per_rank)
        except ValueError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        for part in args.partition if name in SEQ_SCHEDULES else ["uniform"]:
            try:
                cost = _costs(args, plan, part, times)
            except ValueError as exc:  # e.g. a preset with fewer layers than this schedule's stages
                print(f"{name}: skipped ({exc})")
                continue
            res = simulate(plan, cost, comm=args.comm, recv_latency=args.recv_latency)
            if name in SEQ_SCHEDULES and len(args.partition) > 1:
                res.label = f"{name} ({part})"
            results.append(res)
    if not results:
        return 1
    ref = next((r for r in results if r.plan.name == SEQ1F1B), results[0])
    print(f"{'schedule':<22} {'k':>2} {'makespan':>10} {'bubble':>7} {'closed form':>11} {'vs ' + ref.name:>12} "
          f"{'peak live units / rank':<24} peak activation (micro-batches) / rank")
    for res in results:
        p = res.plan
        closed = closed_form_bubble(p.num_ranks, p.n_microbatches, p.n_chunks) if (
            p.name in _CLOSED_FORM and res.cost.source == "equal") else math.nan
        print(f"{res.name:<22} {p.n_chunks:>2} {res.makespan:>10.4g} {res.bubble:>7.3f} {closed:>11.3f} "
              f"{res.makespan / ref.makespan:>12.3f} {str(res.peak_live_units):<24} "
              f"{[round(a, 3) for a in res.peak_activation]}")
    if args.png:
        draw_timeline(results, args.png)
        print(f"timeline written to {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.summary() for r in results], f, indent=1)
    return 0
