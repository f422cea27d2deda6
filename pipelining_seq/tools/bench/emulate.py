"""``bench emulate``: the real schedules and executors, with each unit's compute a sleep.

Every rank builds the real stages (:class:`~pipelining_seq.SequencePipelineStage`), the
real schedule and torch's runtime, and sends the real activations of a model preset
(the ``cpu-bench`` GPT, 2048 tokens, hidden 128: ``[1, chunk, 128]`` float32 over gloo),
but each stage module only sleeps: a forward sleeps the unit's forward time under the
FLOP cost model (:mod:`pipelining_seq.flops`, via the simulator's
:func:`~pipelining_seq.tools.simulate.flop_costs`), a backward its backward time, split
into I and W where the schedule splits the backward (W: the weight-gradient FLOPs, about
a fifth of this preset's backward at 2048 tokens; the rest of it is attention). A
sleeping rank needs no core, so 4 or 8 ranks on a 2-core machine measure the executors
(ordering, p2p, Python between actions), not the cores.

Per schedule it prints the measured makespan (median step time on rank 0, after one
warm-up step, steps bracketed by barriers), the simulator's makespan for the same
costs and action lists (:func:`pipelining_seq.tools.simulate.simulate`), their ratio,
and per rank the seconds per step spent waiting on p2p, in the executor itself
(:class:`~pipelining_seq.tools.bench.breakdown.StepTimers`), and in compute beyond the
simulator's busy time (stage code around the sleeps).
The split schedules (Seq1F1B-ZB and torch's zero-bubble schedules) run I and W through
the stage's weight-gradient store (:meth:`SequencePipelineStage.use_weight_grad_store`),
so that W sleeps exactly W's time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...context import current_chunk
from ...models.gpt import balanced_partition_for, flop_model
from ...partition import uniform_partition
from ...registry import resolve_schedule
from ...schedules import ScheduleSeq1F1B
from ...schedules_interleaved import ScheduleInterleavedSeq1F1B
from ...schedules_zero_bubble import ScheduleSeq1F1BZeroBubble
from ...stage import SequencePipelineStage
from .. import simulate as sim
from .. import torch_schedules
from ..testing import run_ranks
from .breakdown import StepTimers, load_average
from .common import SEQ_SCHEDULES, print_table

__all__ = ["EmulatedStage", "add_arguments", "emulate_worker", "main", "plan_costs"]

logger = logging.getLogger(__name__)

SEQ_LEN = 2048
STAGES_PER_RANK = 2  # the interleaved and V schedules
STAGE_FWD_S = 0.12
"""Seconds of one micro-batch's forward (whole sequence) through one of P stages."""
WARMUP, REPEATS = 1, 3


def _model(ranks: int):
    # The cpu-bench GPT with enough layers for every placement (one layer per stage
    # with two stages per rank).
    return dataclasses.replace(sim.MODEL_PRESETS["cpu-bench"], n_layers=STAGES_PER_RANK * ranks)


def _lengths(partition: str, ranks: int, k: int) -> list[int]:
    if partition == "uniform":
        return uniform_partition(SEQ_LEN, k)
    return balanced_partition_for(_model(ranks), SEQ_LEN, k, multiple_of=min(8, SEQ_LEN // k))


def plan_costs(name: str, ranks: int, m: int, k: int, partition: str) -> tuple[sim.ScheduleOps, sim.CostModel]:
    """The action lists of ``name`` and their FLOP costs in seconds (see module docs)."""
    seq = name in SEQ_SCHEDULES
    plan = sim.build_schedule_ops(name, pp=ranks, microbatches=m, chunks=k if seq else 1,
                                  stages_per_rank=STAGES_PER_RANK)
    model = _model(ranks)
    lengths = _lengths(partition, ranks, k) if seq else [SEQ_LEN]
    cost = sim.flop_costs(plan, model, lengths)
    # One micro-batch's forward through one of P stages = STAGE_FWD_S, for every schedule.
    scale = STAGE_FWD_S / (flop_model(model).stage_costs([SEQ_LEN], ranks)[0][0] / 1e9)
    cost.fwd = [[t * scale for t in row] for row in cost.fwd]
    cost.bwd = [[t * scale for t in row] for row in cost.bwd]
    cost.w = [[t * scale for t in row] for row in cost.w]
    return plan, cost


class _Clock:
    """Sleeps that keep a rank's total compute time exact: on an oversubscribed machine
    every ``time.sleep`` wakes late, by up to milliseconds; the overshoot is carried and
    taken off the next sleeps, so that only the time between sleeps (the executor) and
    waits for peers add to the step."""

    debt = 0.0

    @classmethod
    def sleep(cls, seconds: float) -> None:
        want = seconds - cls.debt
        t0 = time.perf_counter()
        if want > 0:
            time.sleep(want)
        cls.debt = (time.perf_counter() - t0) - want if want > 0 else -want


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, times: tuple[float, float, float],
                module: EmulatedStage) -> torch.Tensor:
        _Clock.sleep(times[0])
        ctx.times, ctx.module, ctx.x_grad = times, module, x.is_floating_point()
        if x.is_floating_point():
            return x.clone()
        return torch.zeros(*x.shape, module.dim)  # the first stage embeds token ids

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        _, t_input, t_weight = ctx.times
        _Clock.sleep(t_input)
        store = ctx.module.store
        if store is None or not store.defer(functools.partial(_Clock.sleep, t_weight)):
            _Clock.sleep(t_weight)
        return (g if ctx.x_grad else None), None, None, None


class EmulatedStage(nn.Module):
    """A stage that sleeps its FLOP time: forward, I and W per chunk (chunk from the unit)."""

    def __init__(self, fwd: list[float], split: list[tuple[float, float]], dim: int) -> None:
        super().__init__()
        self.fwd, self.split, self.dim = list(fwd), list(split), dim
        self.weight = nn.Parameter(torch.zeros(()))
        self.store: Any = None

    def attach_weight_grad_store(self, store: Any) -> int:
        self.store = store
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = current_chunk()
        j = ctx.chunk if ctx is not None else 0
        return _Sleep.apply(x, self.weight, (self.fwd[j], *self.split[j]), self)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.mean()


def _build(name: str, rank: int, ranks: int, m: int, k: int, partition: str) -> tuple[Any, list, sim.SimResult]:
    plan, cost = plan_costs(name, ranks, m, k, partition)
    dim = _model(ranks).dim
    cpu = torch.device("cpu")

    def stage(s: int) -> SequencePipelineStage:
        mod = EmulatedStage(cost.fwd[s], [cost.split_backward(s, j) for j in range(len(cost.fwd[s]))], dim)
        return SequencePipelineStage(mod, s, plan.num_stages, cpu)

    if name in SEQ_SCHEDULES:
        ids = [s for s in range(plan.num_stages) if s % ranks == rank]
        stages = [stage(s) for s in ids]
        common = dict(n_seq_chunks=k, seq_partition=list(cost.lengths))
        if name == "Seq1F1B":
            sched = ScheduleSeq1F1B(stages[0], m, _loss, **common)
        elif name == "InterleavedSeq1F1B":
            sched = ScheduleInterleavedSeq1F1B(stages, m, _loss, **common)
        else:
            sched = ScheduleSeq1F1BZeroBubble(stages[0], m, _loss, **common)
    else:
        ids = torch_schedules.torch_schedule_stages(name, ranks, rank, STAGES_PER_RANK)
        stages = [stage(s) for s in ids]
        for s in stages:  # torch's split backward would re-run the sleeping node in W
            s.use_weight_grad_store()
        cls = torch_schedules.torch_schedule_class(name)
        if issubclass(cls, torch.distributed.pipelining.schedules.PipelineScheduleSingle):
            sched = cls(stages[0], m, _loss, scale_grads=True)
        else:
            sched = cls(stages, m, _loss, scale_grads=True)
    return sched, stages, sim.simulate(plan, cost)


def emulate_worker(rank: int, world: int, names: list[str], m: int, k: int, partition: str) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (m, SEQ_LEN), generator=g)
    y = torch.randint(0, 256, (m, SEQ_LEN), generator=g)
    out = []
    for name in names:
        sched, stages, simulated = _build(name, rank, world, m, k, partition)
        first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)
        times = []
        timers = StepTimers(stages)
        for i in range(WARMUP + REPEATS):
            kwargs: dict[str, Any] = dict(target=y, losses=[]) if last else {}
            dist.barrier()
            t0 = time.perf_counter()
            with timers.step() if i >= WARMUP else contextlib.nullcontext():
                sched.step(x, **kwargs) if first else sched.step(**kwargs)
            dist.barrier()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        summary = timers.summary()
        compute = sum(summary[key] for key in ("F", "B", "I", "W"))
        out.append(dict(schedule=name, measured_s=statistics.median(times), simulated_s=simulated.makespan,
                        breakdown=summary, compute_over=compute - simulated.busy[rank]))
    return out


def _ranking(rows: list[dict], key: str) -> list[str]:
    return [r["schedule"] for r in sorted(rows, key=lambda r: r[key])]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, required=True, help="gloo ranks P")
    parser.add_argument("--microbatches", type=int, required=True, help="micro-batches M")
    parser.add_argument("--chunks", type=int, required=True, help="sequence chunks K (the Seq1F1B schedules)")
    parser.add_argument("--schedules", required=True,
                        help=f"comma-separated: {', '.join(sim.schedule_names())}")
    parser.add_argument("--partition", default="uniform", choices=["uniform", "balanced"],
                        help="chunk lengths (default uniform)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write [{schedule, measured_s, simulated_s, ratio, wait_s, executor_s, compute_over_s}, ...] here")


def main(args: argparse.Namespace) -> int:
    names = []
    for s in (s.strip() for s in args.schedules.split(",") if s.strip()):
        try:
            names.append(resolve_schedule(s).name)
        except ValueError:
            raise SystemExit(f"--schedules {s!r}: choose from {', '.join(sim.schedule_names())}") from None
        if names[-1] not in sim.schedule_names():
            raise SystemExit(f"--schedules {s!r}: choose from {', '.join(sim.schedule_names())}")
    if args.ranks < 1 or args.microbatches < 1 or args.chunks < 1:
        raise SystemExit("--ranks, --microbatches and --chunks must be >= 1")
    for name in names:  # bad combinations fail here, before any process starts
        try:
            plan_costs(name, args.ranks, args.microbatches, args.chunks, args.partition)
        except ValueError as e:
            raise SystemExit(f"bench emulate: {e}") from None
    load_before = load_average()
    results = run_ranks(emulate_worker, args.ranks, names, args.microbatches, args.chunks, args.partition,
                        timeout_s=1800)
    rows = [{key: v for key, v in r.items() if key != "breakdown"} for r in results[0]]
    for i, r in enumerate(rows):
        r["ratio"] = r["measured_s"] / r["simulated_s"]
        # Per rank, seconds per step: waiting on p2p, and the executor's own work.
        r["wait_s"] = [round(res[i]["breakdown"]["wait"], 4) for res in results]
        r["executor_s"] = [round(res[i]["breakdown"]["executor"], 4) for res in results]
        # Measured compute (sleeps, and the stage code around them) over the simulator's.
        r["compute_over_s"] = [round(res[i]["compute_over"], 4) for res in results]
    print(f"bench emulate: {args.ranks} ranks, m={args.microbatches}, k={args.chunks} ({args.partition}); "
          f"load average before / after: {load_before} / {load_average()}")
    print_table(rows, ["schedule", "measured_s", "simulated_s", "ratio", "wait_s", "executor_s", "compute_over_s"],
                formats=dict(measured_s=".3f", simulated_s=".3f", ratio=".3f"))
    seq = [r for r in rows if r["schedule"] in SEQ_SCHEDULES]
    if len(seq) > 1:
        same = _ranking(seq, "measured_s") == _ranking(seq, "simulated_s")
        print(f"Seq1F1B schedules, fastest first: measured {_ranking(seq, 'measured_s')}, "
              f"simulated {_ranking(seq, 'simulated_s')} ({'same' if same else 'DIFFERENT'} ranking)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
