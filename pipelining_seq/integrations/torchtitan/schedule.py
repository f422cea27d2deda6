"""Seq1F1B behind torchtitan's schedule-by-name lookup.

torchtitan picks its pipeline schedule by name through
``torch.distributed.pipelining.schedules.get_schedule_class``, a fixed table with no
registration hook, imported by name into ``torchtitan.distributed.pipeline_parallel``.
It builds single-stage schedules as ``cls(stage, n_microbatches=..., loss_fn=...,
scale_grads=False)`` and decides one stage per rank from
``issubclass(cls, PipelineScheduleSingle)``. So Seq1F1B plugs in as:

* :func:`seq1f1b_schedule_class` — a ``ScheduleSeq1F1B`` subclass with the chunking bound,
  constructible with torchtitan's arguments (its ``sum / global_tokens`` loss with
  ``scale_grads=False`` is the ``loss_reduction="sum"`` convention, which is exact for
  unequal chunks);
* :func:`patch_schedule_lookup` — a context manager that makes
  ``parallelism.pipeline_parallel_schedule = "Seq1F1B"`` resolve to it inside torchtitan,
  delegating every other name to torch.

This module imports nothing from torchtitan.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from torch.distributed.pipelining.schedules import get_schedule_class as _torch_get_schedule_class

from ...partition import SeqPartition
from ...schedules import ScheduleSeq1F1B

__all__ = ["SCHEDULE_NAME", "get_schedule_class", "patch_schedule_lookup", "seq1f1b_schedule_class"]

SCHEDULE_NAME = "Seq1F1B"


def seq1f1b_schedule_class(
    *, n_seq_chunks: int, seq_partition: SeqPartition = "uniform", seq_dim: int = 1, **options: Any
) -> type[ScheduleSeq1F1B]:
    """A ``ScheduleSeq1F1B`` subclass whose chunking is fixed, for name-based builders.

    ``options`` are further ``ScheduleSeq1F1B`` keyword arguments (``seq_len``,
    ``early_recv``, ...) bound the same way.
    """
    bound = dict(n_seq_chunks=n_seq_chunks, seq_partition=seq_partition, seq_dim=seq_dim, **options)

    def __init__(self, stage: Any, n_microbatches: int, loss_fn: Callable | None = None, **kwargs: Any) -> None:
        ScheduleSeq1F1B.__init__(self, stage, n_microbatches, loss_fn, **{**bound, **kwargs})

    return type(f"ScheduleSeq1F1B_k{n_seq_chunks}", (ScheduleSeq1F1B,), {"__init__": __init__})


def get_schedule_class(name: str, **seq1f1b: Any) -> type:
    """torch's lookup, plus ``"Seq1F1B"`` (case-insensitive) bound to ``seq1f1b`` kwargs."""
    if name.lower() == SCHEDULE_NAME.lower():
        if "n_seq_chunks" not in seq1f1b:
            raise ValueError("schedule 'Seq1F1B' needs n_seq_chunks: pass it to patch_schedule_lookup(...)")
        return seq1f1b_schedule_class(**seq1f1b)
    return _torch_get_schedule_class(name)


@contextlib.contextmanager
def patch_schedule_lookup(
    *, module: str = "torchtitan.distributed.pipeline_parallel", **seq1f1b: Any
) -> Iterator[None]:
    """Let ``module``'s ``get_schedule_class`` resolve ``"Seq1F1B"`` while the block runs.

    torchtitan resolves the name while the ``Trainer`` is *built*, so the block must
    wrap ``config.build()``; :func:`pipelining_seq.integrations.torchtitan.enable` does
    this for you.
    """
    target = importlib.import_module(module)
    original = target.get_schedule_class
    cls = get_schedule_class(SCHEDULE_NAME, **seq1f1b)
    target.get_schedule_class = lambda name: cls if name.lower() == SCHEDULE_NAME.lower() else _torch_get_schedule_class(name)
    try:
        yield
    finally:
        target.get_schedule_class = original
