"""The schedule registry: every fact about a pipeline schedule, said once.

Per schedule (:class:`ScheduleInfo`): its class, its per-rank compute orders for
``(p, v, m, k)`` as lists of :class:`Action`, its stage placement, its admissibility
check, and its builder from stage modules and chunking settings. Peak live units have
one rule (:func:`peak_live_units`). The trainer, the planner, the simulator, the
benchmarks and the schedule classes read it; names are looked up case-insensitively.

``pipelining-seq schedules`` prints the table of schedules.

One action type. :class:`Action` is a small immutable ``(kind, stage, unit)`` tuple of
the package rather than torch's ``_Action``: the planner, the simulator and the order
checks are pure functions over it with no private torch name, it reads as (and compares
equal to) the ``(kind, stage, unit)`` tuples that ``compute_orders`` has always returned,
and it stays the same across torch releases. :meth:`Action.to_torch` converts it, through
:mod:`pipelining_seq._compat`, where torch's runtime needs its own IR; torch's schedules
are read back from their IR once, in :func:`torch_orders`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "Action",
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "ScheduleInfo",
    "check_admissible",
    "format_table",
    "main",
    "peak_live_units",
    "rank_stages",
    "resolve_schedule",
    "schedule_class",
    "stage_layer_ranges",
    "stage_ranks",
    "stages_per_rank",
    "torch_orders",
]

KINDS = ("F", "B", "I", "W")
"""Compute kinds: forward, full backward, input-gradient backward, weight-gradient backward."""


class Action(NamedTuple):
    """One compute action: ``kind`` (F, B, I or W) of ``unit`` on pipeline stage ``stage``.

    A unit is a micro-batch for torch's schedules and a (micro-batch n, chunk j) pair,
    ``unit = n*k + j``, for the Seq1F1B ones.
    """

    kind: str
    stage: int
    unit: int

    def to_torch(self) -> Any:
        """torch's ``_Action`` for this action."""
        from . import _compat

        kinds = {"F": _compat.FORWARD, "B": _compat.FULL_BACKWARD, "I": _compat.BACKWARD_INPUT,
                 "W": _compat.BACKWARD_WEIGHT}
        return _compat.Action(self.stage, kinds[self.kind], self.unit)


Orders = dict[int, list[Action]]


def peak_live_units(ops: Sequence[Sequence[Any]]) -> int:
    """Most units whose forward ran and whose backward has not finished, over one rank's
    actions (``Action``\\ s, or any tuples starting with the kind).

    A unit is live from its F until its B, or its W when the backward is split into I and
    W (I frees the stage's input gradient, not the saved activations).
    """
    live = peak = 0
    for op in ops:
        kind = op[0]
        live += 1 if kind == "F" else -1 if kind in ("B", "W") else 0
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class ScheduleInfo:
    """Everything the package knows about one schedule."""

    name: str
    """Canonical spelling (Seq1F1B, or torch's: 1F1B, Interleaved1F1B, ...)."""
    multi_stage: bool
    """Several stages per rank (a ``PipelineScheduleMulti``)."""
    style: str
    """Stage placement over ranks: 'loop' (rank r holds r, r+p, ...) or 'v' (r and 2p-1-r)."""
    seq_chunks: bool
    """Cuts micro-batches into sequence chunks (the package's own schedules)."""
    fixed_stages_per_rank: int | None = None
    """Stages per rank the schedule requires, when it admits only one value."""
    torch_class: str | None = None
    """Class name in ``torch.distributed.pipelining.schedules`` (None for the package's own)."""
    memory_plan: bool = False
    """The planner (``pipelining-seq plan``) models its memory."""

    @property
    def default_stages_per_rank(self) -> int:
        return self.fixed_stages_per_rank or (2 if self.multi_stage else 1)

    @property
    def cls(self) -> type:
        """The class that runs this schedule."""
        return schedule_class(self)

    # ------------------------------------------------------------- placement
    def stages_per_rank(self, configured: int | None = None) -> int:
        """Stages each rank holds: ``configured``, or the default; ValueError if it cannot."""
        spr = self.default_stages_per_rank if configured is None else configured
        if not isinstance(spr, int) or spr < 1:
            raise ValueError(f"stages per rank {spr!r} must be a positive integer")
        if self.fixed_stages_per_rank is not None and spr != self.fixed_stages_per_rank:
            raise ValueError(f"{self.name} runs exactly {self.fixed_stages_per_rank} stage(s) per rank, not {spr}")
        if self.multi_stage and spr < 2:
            raise ValueError(f"{self.name} needs at least 2 stages per rank, not {spr}")
        return spr

    def stage_ranks(self, *, pp: int, stages_per_rank: int) -> list[int]:
        """The pipeline rank holding each stage, for ``pp * stages_per_rank`` stages."""
        n = pp * stages_per_rank
        if self.style == "v":
            return [s if s < pp else n - 1 - s for s in range(n)]
        return [s % pp for s in range(n)]

    def rank_stages(self, *, pp: int, rank: int, stages_per_rank: int) -> list[int]:
        """The stages pipeline rank ``rank`` holds, in increasing order."""
        return [s for s, r in enumerate(self.stage_ranks(pp=pp, stages_per_rank=stages_per_rank)) if r == rank]

    # ------------------------------------------------------------ admissibility
    def check(self, *, pp: int, n_microbatches: int, n_seq_chunks: int = 1, stages_per_rank: int | None = None,
              owner: str | None = None) -> None:
        """ValueError unless the schedule can run ``(p, v, m, k)``, naming the knob."""
        who = owner or self.name
        p, m, k = pp, n_microbatches, n_seq_chunks
        if not self.seq_chunks and k != 1:
            raise ValueError(f"{who} runs whole sequences (no sequence chunks): n_seq_chunks={k} must be 1")
        if self.seq_chunks and m * k < p:
            raise ValueError(
                f"{who}: n_microbatches ({m}) * n_seq_chunks ({k}) = {m * k} units cannot fill {p} pipeline "
                f"ranks: raise n_microbatches or n_seq_chunks so that their product is at least {p}"
            )
        if self.name == "1F1B" and m < p:
            raise ValueError(f"{who} needs n_microbatches ({m}) >= pipeline ranks ({p}): raise n_microbatches")
        if self.name == "DualPipeV" and m < (n_stages := p * self.stages_per_rank(stages_per_rank)):
            raise ValueError(f"{who} needs n_microbatches ({m}) >= pipeline stages ({n_stages}): raise n_microbatches")
        if self.name in ("Interleaved1F1B", "InterleavedZeroBubble") and m % max(1, m // p):
            raise ValueError(
                f"{who} needs n_microbatches ({m}) to be a multiple of its rounds ({m // p} = n_microbatches // "
                f"{p} pipeline ranks): use a multiple of {p}"
            )
        if self.name == "InterleavedSeq1F1B":
            from .schedule_ir_multi import interleaved_group_size

            interleaved_group_size(p, m, k)

    # ------------------------------------------------------------------ orders
    def orders(self, *, pp: int, n_microbatches: int, n_seq_chunks: int = 1,
               stages_per_rank: int | None = None, check: bool = True) -> Orders:
        """Every rank's compute actions, in the order the schedule runs them; ``check=False``
        skips :meth:`check` (an order the schedule class would refuse to run)."""
        v = self.stages_per_rank(stages_per_rank)
        if check:
            self.check(pp=pp, n_microbatches=n_microbatches, n_seq_chunks=n_seq_chunks, stages_per_rank=v)
        build = _OWN_ORDERS.get(self.name)
        if build is None:
            return torch_orders(self, pp, n_microbatches, v)
        return build(pp, v, n_microbatches, n_seq_chunks)

    # ----------------------------------------------------------------- builder
    def build(
        self,
        modules: Sequence[Any],
        stage_indices: Sequence[int],
        num_stages: int,
        device: Any,
        *,
        n_microbatches: int,
        loss_fn: Callable | None,
        chunking: Any = None,
        group: Any = None,
        scale_grads: bool = True,
        **options: Any,
    ) -> tuple[Any, list]:
        """This rank's stages (one per module, at ``stage_indices``) and the schedule driving them.

        The Seq1F1B schedules get :class:`~pipelining_seq.SequencePipelineStage`\\ s and
        ``chunking`` (a :class:`~pipelining_seq.ChunkingConfig`); torch's get plain
        ``PipelineStage``\\ s. ``options`` go to the schedule class (e.g. ``early_recv``).
        """
        if len(modules) != len(stage_indices):
            raise ValueError(f"{self.name}: {len(modules)} stage modules for stage indices {list(stage_indices)}")
        if self.seq_chunks:
            from .stage import SequencePipelineStage as stage_cls
        else:
            from torch.distributed.pipelining import PipelineStage as stage_cls

            if chunking is not None and chunking.n_seq_chunks != 1:
                raise ValueError(f"{self.name} runs whole sequences: chunking must be None, got {chunking}")
        stages = [stage_cls(mod, s, num_stages, device, group=group) for mod, s in zip(modules, stage_indices)]
        first = stages if self.multi_stage else stages[0]
        if self.seq_chunks:
            return self.cls(first, n_microbatches, loss_fn, chunking=chunking, scale_grads=scale_grads, **options), stages
        return self.cls(first, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads, **options), stages


SCHEDULES: tuple[ScheduleInfo, ...] = (
    ScheduleInfo("Seq1F1B", False, "loop", True, 1, memory_plan=True),
    ScheduleInfo("InterleavedSeq1F1B", True, "loop", True, memory_plan=True),
    # A PipelineScheduleMulti underneath (torch's action runtime), but one stage per rank.
    ScheduleInfo("Seq1F1BZeroBubble", False, "loop", True, 1, memory_plan=True),
    ScheduleInfo("1F1B", False, "loop", False, 1, "Schedule1F1B", memory_plan=True),
    ScheduleInfo("GPipe", False, "loop", False, 1, "ScheduleGPipe", memory_plan=True),
    ScheduleInfo("Interleaved1F1B", True, "loop", False, None, "ScheduleInterleaved1F1B"),
    ScheduleInfo("LoopedBFS", True, "loop", False, None, "ScheduleLoopedBFS"),
    ScheduleInfo("InterleavedZeroBubble", True, "loop", False, None, "ScheduleInterleavedZeroBubble"),
    ScheduleInfo("ZBVZeroBubble", True, "v", False, 2, "ScheduleZBVZeroBubble"),
    ScheduleInfo("DualPipeV", True, "v", False, 2, "ScheduleDualPipeV"),
)
"""Every schedule the package runs, plans or simulates."""

_BY_KEY = {s.name.lower(): s for s in SCHEDULES}

SCHEDULE_NAMES: tuple[str, ...] = tuple(s.name for s in SCHEDULES)
"""Every schedule name the package accepts, canonical spelling."""

_OWN_CLASSES = {
    "Seq1F1B": ("schedules", "ScheduleSeq1F1B"),
    "InterleavedSeq1F1B": ("schedules_interleaved", "ScheduleInterleavedSeq1F1B"),
    "Seq1F1BZeroBubble": ("schedules_zero_bubble", "ScheduleSeq1F1BZeroBubble"),
}


def resolve_schedule(name: str | ScheduleInfo) -> ScheduleInfo:
    """The schedule called ``name`` (case-insensitive); ValueError listing the choices."""
    if isinstance(name, ScheduleInfo):
        return name
    info = _BY_KEY.get(str(name).lower())
    if info is None:
        raise ValueError(f"schedule {name!r} is not known: use one of {', '.join(SCHEDULE_NAMES)}")
    return info


def schedule_class(info: ScheduleInfo | str) -> type:
    """The class that runs ``info`` (imported lazily: torch's, or the package's)."""
    info = resolve_schedule(info)
    if info.torch_class is None:
        import importlib

        module, cls = _OWN_CLASSES[info.name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    from torch.distributed.pipelining import schedules

    return getattr(schedules, info.torch_class)


def stages_per_rank(info: ScheduleInfo | str, configured: int | None = None) -> int:
    """Stages each rank holds under ``info`` (:meth:`ScheduleInfo.stages_per_rank`)."""
    return resolve_schedule(info).stages_per_rank(configured)


def stage_ranks(info: ScheduleInfo | str, *, pp: int, stages_per_rank: int) -> list[int]:
    """The pipeline rank holding each stage (:meth:`ScheduleInfo.stage_ranks`)."""
    return resolve_schedule(info).stage_ranks(pp=pp, stages_per_rank=stages_per_rank)


def rank_stages(info: ScheduleInfo | str, *, pp: int, rank: int, stages_per_rank: int) -> list[int]:
    """The stages pipeline rank ``rank`` holds (:meth:`ScheduleInfo.rank_stages`)."""
    return resolve_schedule(info).rank_stages(pp=pp, rank=rank, stages_per_rank=stages_per_rank)


def check_admissible(name: str | ScheduleInfo, *, pp: int, n_microbatches: int, n_seq_chunks: int = 1,
                     stages_per_rank: int | None = None, owner: str | None = None) -> None:
    """ValueError unless schedule ``name`` can run ``(p, v, m, k)`` (:meth:`ScheduleInfo.check`)."""
    resolve_schedule(name).check(pp=pp, n_microbatches=n_microbatches, n_seq_chunks=n_seq_chunks,
                                 stages_per_rank=stages_per_rank, owner=owner)


# ------------------------------------------------------------------------- orders
def _seq1f1b_orders(p: int, v: int, m: int, k: int) -> Orders:
    from .schedule_ir import compute_order

    return {r: [Action(kind, r, u) for kind, u in compute_order(p, r, m, k)] for r in range(p)}


def _interleaved_orders(p: int, v: int, m: int, k: int) -> Orders:
    from .schedule_ir_multi import interleaved_orders

    return interleaved_orders(p, v, m, k)


def _zero_bubble_orders(p: int, v: int, m: int, k: int) -> Orders:
    from .schedule_ir_multi import zero_bubble_orders

    return zero_bubble_orders(p, m, k)


_OWN_ORDERS: dict[str, Callable[[int, int, int, int], Orders]] = {
    "Seq1F1B": _seq1f1b_orders,
    # Schedule1F1B runs exactly Seq1F1B's order with k=1. Its own IR (_get_pipeline_order)
    # is off by one on the last rank in torch 2.13 (F1..F8 instead of F0..F7): not read back.
    "1F1B": _seq1f1b_orders,
    "InterleavedSeq1F1B": _interleaved_orders,
    "Seq1F1BZeroBubble": _zero_bubble_orders,
}


def torch_orders(info: ScheduleInfo, pp: int, n_microbatches: int, stages_per_rank: int) -> Orders:
    """A torch schedule's compute actions per rank, read back from its own IR (built by
    torch's schedule visualizer on mock stages, no process group); bubbles and
    non-compute actions dropped, overlapped F/B pairs expanded in their listed order."""
    from . import _compat

    ir = _compat.schedule_ops(schedule_class(info), pp, n_microbatches, stages_per_rank)
    out: Orders = {}
    for rank, actions in enumerate(ir):
        flat = []
        for a in actions:
            for sub in (() if a is None else (a.sub_actions or (a,))):
                kind = sub.computation_type.value
                if kind in KINDS:
                    flat.append(Action(kind, sub.stage_index, sub.microbatch_index))
        out[rank] = flat
    # A schedule's IR is only a description; check it covers every micro-batch once.
    for rank, flat in out.items():
        for stage in info.rank_stages(pp=pp, rank=rank, stages_per_rank=stages_per_rank):
            fwd = sorted(a.unit for a in flat if a.stage == stage and a.kind == "F")
            if fwd != list(range(n_microbatches)):
                raise RuntimeError(
                    f"torch {info.torch_class} IR for rank {rank} runs forwards {fwd} on stage {stage}, "
                    f"not micro-batches 0..{n_microbatches - 1}: its pipeline order is unusable here"
                )
    return out


def stage_layer_ranges(n_layers: int, num_stages: int) -> list[range]:
    """Contiguous, as-even-as-possible layer ranges per stage (earlier stages get the extra)."""
    if num_stages < 1 or n_layers < num_stages:
        raise ValueError(
            f"cannot split {n_layers} layers over {num_stages} pipeline stages: "
            "every stage needs at least one layer (lower pipeline_parallel_degree or add layers)"
        )
    base, extra = divmod(n_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


# -------------------------------------------------------------------------- table
def format_table() -> str:
    """The registry as a table (``python -m pipelining_seq.registry``)."""
    rows = [("name", "class", "chunks", "stages/rank", "placement", "orders", "planned")]
    for s in SCHEDULES:
        spr = str(s.fixed_stages_per_rank) if s.fixed_stages_per_rank else f">=2 (default {s.default_stages_per_rank})"
        cls = f"torch {s.torch_class}" if s.torch_class else f"pipelining_seq.{_OWN_CLASSES[s.name][1]}"
        orders = "package" if s.name in _OWN_ORDERS else "torch IR"
        rows.append((s.name, cls, "yes" if s.seq_chunks else "no", spr, s.style, orders, "yes" if s.memory_plan else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def add_arguments(parser: Any, *, command: str) -> None:
    """``pipelining-seq schedules``: no options."""
    parser.description = "Print the schedules the package runs, plans and simulates, from its registry."


def main(args: Any = None) -> int:
    print(format_table())
    return 0


if __name__ == "__main__":
    main()
