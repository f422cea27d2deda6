"""Schedule names and stage placement: re-exported from :mod:`pipelining_seq.registry`.

The registry is the one place a schedule is described; this module keeps the names that
were imported from here.
"""

from __future__ import annotations

from .registry import (
    SCHEDULE_NAMES,
    ScheduleInfo,
    rank_stages,
    resolve_schedule,
    schedule_class,
    stage_ranks,
    stages_per_rank,
)

__all__ = [
    "SCHEDULE_NAMES",
    "ScheduleInfo",
    "rank_stages",
    "resolve_schedule",
    "schedule_class",
    "stage_ranks",
    "stages_per_rank",
]
