"""torch's own schedules as plain action lists (for the simulator and the benchmarks).

Builds the real torch schedule class on probe stages (no process group) and reads back
its ``_Action`` IR through :mod:`pipelining_seq._compat`.
"""

from __future__ import annotations

from torch.distributed.pipelining import schedules as _schedules

from .. import _compat, placement

__all__ = ["torch_schedule_actions", "torch_schedule_class", "torch_schedule_names", "torch_schedule_stages"]

# Every torch schedule of pipelining_seq.placement except LoopedBFS (a breadth-first
# baseline nobody benchmarks against; its memory grows with the micro-batch count).
_NAMES = tuple(i.name for i in map(placement.resolve_schedule, placement.SCHEDULE_NAMES)
               if i.torch_class is not None and i.name != "LoopedBFS")


class _ScheduleProbeStage:
    """Just enough of a pipeline stage for a schedule's constructor to build its IR."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int, group_rank: int) -> None:
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_size = group_size
        self.group_rank = group_rank
        self.submod = None
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.has_backward = True


def torch_schedule_names() -> list[str]:
    """Names of torch schedules :func:`torch_schedule_actions` can expand."""
    return list(_NAMES)


def _info(name: str) -> placement.ScheduleInfo:
    if name not in _NAMES:
        raise ValueError(f"unknown torch schedule {name!r}: choose one of {torch_schedule_names()}")
    return placement.resolve_schedule(name)


def torch_schedule_class(name: str) -> type:
    """The torch schedule class behind a name of :func:`torch_schedule_names`."""
    return placement.schedule_class(_info(name))


def torch_schedule_stages(name: str, num_ranks: int, rank: int, stages_per_rank: int = 2) -> list[int]:
    """Stage indices rank ``rank`` holds under schedule ``name`` (loop or V placement)."""
    info = _info(name)
    spr = info.fixed_stages_per_rank or stages_per_rank
    return placement.rank_stages(info, pp=num_ranks, rank=rank, stages_per_rank=spr)


def torch_schedule_actions(
    name: str, num_ranks: int, n_microbatches: int, *, stages_per_rank: int = 2
) -> dict[int, list[tuple[int, str, int]]]:
    """Compute actions ``(stage, "F"|"B"|"I"|"W", microbatch)`` of every rank, in order.

    Builds the real torch schedule on probe stages (no process group) and reads its
    IR; bubbles (``None``) and non-compute actions are dropped, overlapped F/B pairs
    are expanded in their listed order.
    """
    cls = torch_schedule_class(name)
    order: dict[int, list] = {}
    for rank in range(num_ranks):
        ids = torch_schedule_stages(name, num_ranks, rank, stages_per_rank)
        total = num_ranks * len(ids)
        stages = [_ScheduleProbeStage(s, total, num_ranks, rank) for s in ids]
        if issubclass(cls, _schedules.PipelineScheduleSingle):
            sched = cls(stages[0], n_microbatches)
            ir = _compat.single_schedule_order(sched)
        else:
            sched = cls(stages, n_microbatches)
            ir = sched.pipeline_order
        order[rank] = ir.get(rank, [])
    out: dict[int, list[tuple[int, str, int]]] = {}
    for rank, actions in order.items():
        flat: list[tuple[int, str, int]] = []
        for a in actions:
            if a is None:
                continue
            for sub in a.sub_actions or (a,):
                kind = sub.computation_type.value
                if kind in ("F", "B", "I", "W"):
                    flat.append((sub.stage_index, kind, sub.microbatch_index))
        out[rank] = flat
    # A schedule's IR is only a description; check it covers every micro-batch once.
    for rank, flat in out.items():
        for stage in torch_schedule_stages(name, num_ranks, rank, stages_per_rank):
            fwd = sorted(mb for s, kind, mb in flat if s == stage and kind == "F")
            if fwd != list(range(n_microbatches)):
                raise RuntimeError(
                    f"torch {cls.__name__} IR for rank {rank} runs forwards {fwd} on stage {stage}, "
                    f"not micro-batches 0..{n_microbatches - 1}: its _get_pipeline_order is unusable here"
                )
    return out
