"""The Seq1F1B schedules behind torchtitan's schedule-by-name lookup.

torchtitan picks its pipeline schedule by name through
``torch.distributed.pipelining.schedules.get_schedule_class``, a fixed table with no
registration hook, imported by name into ``torchtitan.distributed.pipeline_parallel``.
From the class it decides the stages per rank (``issubclass(cls, PipelineScheduleSingle)``:
one, else ``pipeline_parallel_layers_per_stage`` or two), then builds it as
``cls(stage, n_microbatches=..., loss_fn=..., scale_grads=False)`` for one stage per rank,
or ``cls(stages, ..., backward_requires_autograd=True)`` for several. So the package's
three schedules plug in as:

* :func:`seq1f1b_schedule_class` — a subclass of ``ScheduleSeq1F1B``,
  ``ScheduleInterleavedSeq1F1B`` or ``ScheduleSeq1F1BZeroBubble`` with the chunking bound,
  constructible with torchtitan's arguments (its ``sum / global_tokens`` loss with
  ``scale_grads=False`` is the ``loss_reduction="sum"`` convention, exact for unequal
  chunks);
* :func:`patch_schedule_lookup` — a context manager that makes a Seq1F1B name resolve to
  it inside torchtitan, delegating every other name to torch's lookup.

Names resolve case-insensitively through the package's schedule table
(:func:`pipelining_seq.registry.resolve_schedule`). This module imports nothing from
torchtitan.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.pipelining.schedules import get_schedule_class as _torch_get_schedule_class

from ...partition import SeqPartition
from ...registry import SCHEDULE_NAMES, resolve_schedule, schedule_class

__all__ = [
    "SCHEDULE_NAME",
    "check_schedule_name",
    "get_schedule_class",
    "patch_schedule_lookup",
    "seq1f1b_name",
    "seq1f1b_names",
    "seq1f1b_schedule_class",
]

SCHEDULE_NAME = "Seq1F1B"


def seq1f1b_names() -> tuple[str, ...]:
    """The package's sequence-chunked schedule names (canonical spelling)."""
    return tuple(n for n in SCHEDULE_NAMES if resolve_schedule(n).seq_chunks)


def seq1f1b_name(name: str) -> str | None:
    """The canonical Seq1F1B schedule ``name`` denotes (case-insensitive), else None."""
    try:
        info = resolve_schedule(str(name))
    except ValueError:
        return None
    return info.name if info.seq_chunks else None


def check_schedule_name(name: str) -> None:
    """Raise, listing every valid name, unless torch or the package knows ``name``."""
    if seq1f1b_name(name) is not None:
        return
    try:
        _torch_get_schedule_class(str(name))
    except ValueError:
        raise ValueError(
            f"--parallelism.pipeline_parallel_schedule {name!r} is not a known schedule: use one of "
            f"{', '.join(SCHEDULE_NAMES)} (case-insensitive)"
        ) from None


def _drop_autograd_flag(kwargs: dict) -> None:
    # torchtitan passes backward_requires_autograd to multi-stage schedules; False is its
    # graph-PP runner, whose precompiled backward knows nothing of chunk K/V gradients.
    if not kwargs.pop("backward_requires_autograd", True):
        raise ValueError(
            "Seq1F1B schedules run the backward through autograd: torchtitan's graph pipeline "
            "(backward_requires_autograd=False) is not supported; use the eager trainer"
        )


def seq1f1b_schedule_class(
    *, n_seq_chunks: int, seq_partition: SeqPartition = "uniform", seq_dim: int = 1,
    schedule: str = SCHEDULE_NAME, **options: Any,
) -> type:
    """A class for ``schedule`` (any Seq1F1B name) with the chunking fixed, for name-based builders.

    ``options`` are further schedule keyword arguments (``seq_len``, ...) bound the same
    way. For ``Seq1F1BZeroBubble`` the returned class is a ``PipelineScheduleSingle``
    whose construction returns the zero-bubble schedule: it runs one stage per rank on
    torch's multi-stage action runtime, and torchtitan reads "one stage per rank" from
    ``issubclass(cls, PipelineScheduleSingle)`` alone.
    """
    name = seq1f1b_name(schedule)
    if name is None:
        raise ValueError(f"{schedule!r} is not one of the Seq1F1B schedules {', '.join(seq1f1b_names())}")
    base = schedule_class(resolve_schedule(name))
    bound = dict(n_seq_chunks=n_seq_chunks, seq_partition=seq_partition, seq_dim=seq_dim, **options)
    cls_name = f"Schedule{name}_k{n_seq_chunks}"

    def __init__(self, stage: Any, n_microbatches: int, loss_fn: Callable | None = None, **kwargs: Any) -> None:
        _drop_autograd_flag(kwargs)
        base.__init__(self, stage, n_microbatches, loss_fn, **{**bound, **kwargs})

    cls = type(cls_name, (base,), {"__init__": __init__, "__module__": __name__})
    if name != "Seq1F1BZeroBubble":
        return cls

    def __new__(factory: type, stage: Any, n_microbatches: int, loss_fn: Callable | None = None, **kwargs: Any):
        return cls(stage, n_microbatches, loss_fn, **kwargs)

    return type(cls_name, (PipelineScheduleSingle,), {"__new__": __new__, "__module__": __name__, "built": cls})


def get_schedule_class(name: str, **seq1f1b: Any) -> type:
    """torch's lookup, plus the Seq1F1B names (case-insensitive) bound to ``seq1f1b`` kwargs."""
    canonical = seq1f1b_name(name)
    if canonical is not None:
        if "n_seq_chunks" not in seq1f1b:
            raise ValueError(f"schedule {canonical!r} needs n_seq_chunks: pass it to patch_schedule_lookup(...)")
        return seq1f1b_schedule_class(schedule=canonical, **seq1f1b)
    check_schedule_name(name)
    return _torch_get_schedule_class(name)


@contextlib.contextmanager
def patch_schedule_lookup(
    *, module: str = "torchtitan.distributed.pipeline_parallel", schedule: str = SCHEDULE_NAME, **seq1f1b: Any
) -> Iterator[None]:
    """Let ``module``'s ``get_schedule_class`` resolve ``schedule`` (a Seq1F1B name) while the block runs.

    torchtitan resolves the name while the ``Trainer`` is *built*, so the block must
    wrap ``config.build()``; :func:`pipelining_seq.integrations.torchtitan.enable` does
    this for you.
    """
    target = importlib.import_module(module)
    original = target.get_schedule_class
    canonical = seq1f1b_name(schedule)
    cls = get_schedule_class(schedule, **seq1f1b)
    target.get_schedule_class = lambda name: cls if seq1f1b_name(name) == canonical else _torch_get_schedule_class(name)
    try:
        yield
    finally:
        target.get_schedule_class = original
