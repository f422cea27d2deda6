"""torch's own schedules as plain action lists (for the simulator and the benchmarks).

The orders come from :mod:`pipelining_seq.registry` (:func:`~pipelining_seq.registry.torch_orders`
reads torch's IR back through its own schedule visualizer); this module names the torch
schedules the tools offer.
"""

from __future__ import annotations

from .. import registry

__all__ = ["torch_schedule_actions", "torch_schedule_class", "torch_schedule_names", "torch_schedule_stages"]

# Every torch schedule of the registry except LoopedBFS (a breadth-first baseline nobody
# benchmarks against; its memory grows with the micro-batch count).
_EXCLUDED = {"loopedbfs"}


def torch_schedule_names() -> list[str]:
    """Names of torch schedules :func:`torch_schedule_actions` can expand."""
    return [s.name for s in registry.SCHEDULES if s.torch_class is not None and s.name.lower() not in _EXCLUDED]


def _info(name: str) -> registry.ScheduleInfo:
    info = registry.resolve_schedule(name) if name.lower() not in _EXCLUDED else None
    if info is None or info.torch_class is None:
        raise ValueError(f"unknown torch schedule {name!r}: choose one of {torch_schedule_names()}")
    return info


def torch_schedule_class(name: str) -> type:
    """The torch schedule class behind a name of :func:`torch_schedule_names`."""
    return _info(name).cls


def torch_schedule_stages(name: str, num_ranks: int, rank: int, stages_per_rank: int = 2) -> list[int]:
    """Stage indices rank ``rank`` holds under schedule ``name`` (loop or V placement)."""
    info = _info(name)
    spr = info.fixed_stages_per_rank or stages_per_rank
    return info.rank_stages(pp=num_ranks, rank=rank, stages_per_rank=spr)


def torch_schedule_actions(
    name: str, num_ranks: int, n_microbatches: int, *, stages_per_rank: int = 2
) -> dict[int, list[registry.Action]]:
    """Compute actions of every rank, in order, as torch's IR lists them."""
    info = _info(name)
    return registry.torch_orders(info, num_ranks, n_microbatches, info.fixed_stages_per_rank or stages_per_rank)
