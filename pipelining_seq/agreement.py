"""Do all ranks run the same pipeline? One small collective, before the first step.

Ranks that disagree on the micro-batch count, the chunk count or the partition do not
fail cleanly on their own: mismatched sends and receives either abort gloo with a message
naming none of them, hang until the process-group timeout, or (forward only, where
shapes happen to fit) return wrong losses. :func:`check` exchanges a 32-byte digest of
each rank's settings (one ``all_gather``); only when the digests differ does it gather the
settings themselves and raise :class:`AgreementError` naming the first field that differs
and the ranks on each side.

:class:`pipelining_seq.ScheduleSeq1F1B` calls :func:`check_schedule` on its first
``step`` and its first ``eval``; the trainer checks the whole recipe (model shape,
parallel layout, schedule, partition) before its first step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from . import p2p

__all__ = [
    "AgreementError", "check", "check_schedule", "describe_partition", "first_difference", "keyword_input_names",
]

logger = logging.getLogger(__name__)


class AgreementError(RuntimeError):
    """Ranks of one job run with different settings."""


def describe_partition(partition: Any) -> Any:
    """A rank-independent description of a ``seq_partition`` (callables by name and arguments)."""
    if isinstance(partition, functools.partial):
        kwargs = {k: partition.keywords[k] for k in sorted(partition.keywords)}
        return {"callable": describe_partition(partition.func), "args": list(partition.args), "kwargs": kwargs}
    if callable(partition):
        return f"{getattr(partition, '__module__', '?')}.{getattr(partition, '__qualname__', type(partition).__name__)}"
    if isinstance(partition, (list, tuple)):
        return [int(x) for x in partition]
    return partition


def _canonical(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, default=repr)


def _flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def first_difference(per_rank: list[dict[str, Any]]) -> tuple[str, dict[str, list[int]]] | None:
    """The first field (in the first rank's order; nested sections as ``section.field``) on
    which ranks differ, with the ranks holding each value; None when all agree."""
    per_rank = [_flatten(f) for f in per_rank]
    keys = list(per_rank[0]) + [k for f in per_rank[1:] for k in f if k not in per_rank[0]]
    for key in keys:
        groups: dict[str, list[int]] = {}
        for rank, fields in enumerate(per_rank):
            groups.setdefault(_canonical({"v": fields.get(key, "<missing>")})[6:-1], []).append(rank)
        if len(groups) > 1:
            return key, groups
    return None


def check(fields: dict[str, Any], *, group: Any = None, what: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`AgreementError` unless every rank of ``group`` passes equal ``fields``.

    Collective over ``group`` (default: the world); a no-op without a process group."""
    if not dist.is_initialized():
        return
    n = dist.get_world_size(group)
    if n == 1:
        return
    digest = torch.frombuffer(bytearray(hashlib.sha256(_canonical(fields).encode()).digest()), dtype=torch.uint8)
    digest = digest.to(device)
    out = [torch.empty_like(digest) for _ in range(n)]
    # Through the pipeline's bounded wait: a stalled peer is named like any other wait.
    p2p.wait_collective(dist.all_gather(out, digest, group=group, async_op=True), desc=f"{what}: agreement all_gather",
                        group=group)
    if all(torch.equal(o, out[0]) for o in out):
        return
    per_rank: list[Any] = [None] * n
    dist.all_gather_object(per_rank, fields, group=group)
    diff = first_difference(per_rank)
    if diff is None:  # digests differ but fields compare equal: report it all
        raise AgreementError(f"{what}: ranks disagree: {per_rank}")
    key, groups = diff
    sides = "; ".join(f"{value} on rank(s) {ranks}" for value, ranks in groups.items())
    raise AgreementError(
        f"{what}: ranks disagree on {key}: {sides} (ranks of one group in the process group's numbering); "
        + _HINTS.get(key, "every rank must be given the same settings")
    )


_HINTS = {
    "step_keyword_inputs": (
        "pass the same keyword inputs (document_ids=..., ...) to step() on every stage: each stage's "
        "attention needs them, and a stage without document_ids would attend across documents"
    ),
}


_PRE_SPLIT = ("arg_mbs", "kwarg_mbs", "target_mbs")


def keyword_input_names(kwargs: Any) -> list[str]:
    """Names of the keyword inputs a ``step`` call gives the stage (``document_ids``, ...):
    the whole-batch keywords, or the keys of torchtitan's pre-split ``kwarg_mbs``; a
    keyword given as None counts as absent."""
    kwargs = dict(kwargs or {})
    mbs = kwargs.get("kwarg_mbs")
    if mbs:
        kwargs = dict(mbs[0] or {})
    return sorted(k for k, v in kwargs.items() if k not in _PRE_SPLIT and v is not None)


def check_schedule(schedule: Any, *, stage: Any, units: Any, keyword_inputs: Any = None) -> None:
    """A sequence-chunked schedule's check on its first ``step`` and first ``eval`` (over
    ``stage``'s group); ``units`` is the schedule's :class:`~pipelining_seq.seq_units.SeqUnits`,
    ``keyword_inputs`` the step's keyword inputs (a dict, see :func:`keyword_input_names`):
    a stage given ``document_ids`` while another is not would mask attention on one
    stage and not on the next, and train on wrong losses."""
    kind = "step" if schedule._has_backward else "eval"
    done = schedule.__dict__.setdefault("_agreed_kinds", set())
    if kind in done:
        return
    fields = {
        "call": kind,
        "schedule": type(schedule).__name__,
        "num_stages": stage.num_stages,
        "n_microbatches": units.n_microbatches,
        "n_seq_chunks": units.n_seq_chunks,
        "seq_partition": describe_partition(units.seq_partition),
        "seq_len": units.seq_len,
        "seq_dim": units.seq_dim,
        "loss_reduction": units.loss_reduction,
        "scale_grads": bool(schedule.scale_grads),
        "verify_chunking": getattr(stage, "_chunk_check", None) is not None,
        "step_keyword_inputs": keyword_input_names(keyword_inputs),
    }
    name = type(schedule).__name__
    check(fields, group=stage.group, what=f"{name}.{kind} (stage {stage.stage_index})", device=stage.device)
    done.add(kind)
