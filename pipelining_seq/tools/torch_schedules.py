"""torch's own schedules as plain action lists (for the simulator and the benchmarks).

Builds the real torch schedule class on probe stages (no process group) and reads back
its ``_Action`` IR through :mod:`pipelining_seq._compat`.
"""

from __future__ import annotations

from torch.distributed.pipelining import schedules as _schedules

from .. import _compat

__all__ = ["torch_schedule_actions", "torch_schedule_class", "torch_schedule_names", "torch_schedule_stages"]



_TORCH_SCHEDULES = {
    "1F1B": ("Schedule1F1B", 1, "loop"),
    "GPipe": ("ScheduleGPipe", 1, "loop"),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", None, "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", None, "loop"),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", 2, "v"),
    "DualPipeV": ("ScheduleDualPipeV", 2, "v"),
}


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
    return list(_TORCH_SCHEDULES)


def torch_schedule_class(name: str) -> type:
    """The torch schedule class behind a name of :func:`torch_schedule_names`."""
    if name not in _TORCH_SCHEDULES:
        raise ValueError(f"unknown torch schedule {name!r}: choose one of {torch_schedule_names()}")
    return getattr(_schedules, _TORCH_SCHEDULES[name][0])


def torch_schedule_stages(name: str, num_ranks: int, rank: int, stages_per_rank: int = 2) -> list[int]:
    """Stage indices rank ``rank`` holds under schedule ``name`` (loop or V placement)."""
    _, fixed, style = _TORCH_SCHEDULES[name] if name in _TORCH_SCHEDULES else (None, None, None)
    if style is None:
        raise ValueError(f"unknown torch schedule {name!r}: choose one of {torch_schedule_names()}")
    v = fixed or stages_per_rank
    if style == "v":
        return [rank, 2 * num_ranks - 1 - rank]
    return [rank + i * num_ranks for i in range(v)]


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
