"""Schedule names and stage placement: which rank holds which pipeline stage.

Every place that takes a schedule by name (recipes, the planner, the simulator, the
benchmarks, torchtitan's lookup) resolves it here, case-insensitively, to one
:class:`ScheduleInfo`; every place that needs the stages of a rank asks
:func:`stage_ranks` / :func:`rank_stages`. Placement styles are torch's: ``loop`` (rank r
holds stages r, r+p, r+2p, ...) and ``v`` (rank r holds r and 2p-1-r).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SCHEDULE_NAMES",
    "ScheduleInfo",
    "rank_stages",
    "resolve_schedule",
    "schedule_class",
    "stage_ranks",
    "stages_per_rank",
]


@dataclass(frozen=True)
class ScheduleInfo:
    """What the rest of the package needs to know about a schedule name."""

    name: str
    """Canonical spelling (Seq1F1B, or torch's: 1F1B, Interleaved1F1B, ...)."""
    multi_stage: bool
    """Several stages per rank (a ``PipelineScheduleMulti``)."""
    style: str
    """Stage placement over ranks: 'loop' or 'v'."""
    seq_chunks: bool
    """Cuts micro-batches into sequence chunks (the package's own schedules)."""
    fixed_stages_per_rank: int | None = None
    """Stages per rank the schedule requires, when it admits only one value."""
    torch_class: str | None = None
    """Class name in ``torch.distributed.pipelining.schedules`` (None for the package's own)."""

    @property
    def default_stages_per_rank(self) -> int:
        return self.fixed_stages_per_rank or (2 if self.multi_stage else 1)


_SCHEDULES = (
    ScheduleInfo("Seq1F1B", multi_stage=False, style="loop", seq_chunks=True, fixed_stages_per_rank=1),
    ScheduleInfo("1F1B", False, "loop", False, 1, "Schedule1F1B"),
    ScheduleInfo("GPipe", False, "loop", False, 1, "ScheduleGPipe"),
    ScheduleInfo("Interleaved1F1B", True, "loop", False, None, "ScheduleInterleaved1F1B"),
    ScheduleInfo("LoopedBFS", True, "loop", False, None, "ScheduleLoopedBFS"),
    ScheduleInfo("InterleavedZeroBubble", True, "loop", False, None, "ScheduleInterleavedZeroBubble"),
    ScheduleInfo("ZBVZeroBubble", True, "v", False, 2, "ScheduleZBVZeroBubble"),
    ScheduleInfo("DualPipeV", True, "v", False, 2, "ScheduleDualPipeV"),
)
_BY_KEY = {s.name.lower(): s for s in _SCHEDULES}

SCHEDULE_NAMES: tuple[str, ...] = tuple(s.name for s in _SCHEDULES)
"""Every schedule name the package accepts, canonical spelling."""


def resolve_schedule(name: str) -> ScheduleInfo:
    """The schedule called ``name`` (case-insensitive); ValueError listing the choices."""
    info = _BY_KEY.get(str(name).lower())
    if info is None:
        raise ValueError(f"schedule {name!r} is not known: use one of {', '.join(SCHEDULE_NAMES)}")
    return info


def schedule_class(info: ScheduleInfo) -> type:
    """The class that runs ``info`` (imported lazily: torch's, or the package's)."""
    if info.torch_class is None:
        from .schedules import ScheduleSeq1F1B

        return {"Seq1F1B": ScheduleSeq1F1B}[info.name]
    from torch.distributed.pipelining import schedules

    return getattr(schedules, info.torch_class)


def stages_per_rank(info: ScheduleInfo, configured: int | None = None) -> int:
    """Stages each rank holds: ``configured``, or the schedule's default; ValueError if it cannot."""
    spr = info.default_stages_per_rank if configured is None else configured
    if not isinstance(spr, int) or spr < 1:
        raise ValueError(f"stages per rank {spr!r} must be a positive integer")
    if info.fixed_stages_per_rank is not None and spr != info.fixed_stages_per_rank:
        raise ValueError(f"{info.name} runs exactly {info.fixed_stages_per_rank} stage(s) per rank, not {spr}")
    if info.multi_stage and spr < 2:
        raise ValueError(f"{info.name} needs at least 2 stages per rank, not {spr}")
    return spr


def stage_ranks(info: ScheduleInfo, *, pp: int, stages_per_rank: int) -> list[int]:
    """The pipeline rank holding each stage, for ``pp * stages_per_rank`` stages."""
    n = pp * stages_per_rank
    if info.style == "v":
        return [s if s < pp else n - 1 - s for s in range(n)]
    return [s % pp for s in range(n)]


def rank_stages(info: ScheduleInfo, *, pp: int, rank: int, stages_per_rank: int) -> list[int]:
    """The stages pipeline rank ``rank`` holds, in increasing order."""
    return [s for s, r in enumerate(stage_ranks(info, pp=pp, stages_per_rank=stages_per_rank)) if r == rank]
