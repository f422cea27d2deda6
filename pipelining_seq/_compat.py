"""Every use of a private torch API lives here.

torch.distributed.pipelining keeps its schedule IR (``_Action``), its p2p helpers and
its simulator private, and their signatures move between releases (2.11 and 2.13 differ
in ``_initialize_stage``, ``_maybe_compute_loss`` and metadata inference). Keeping the
imports in one module means a torch upgrade breaks in one place, and
``tests/test_compat.py`` fails loudly when a signature moves.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as _schedules
from torch.distributed.pipelining import stage as _stage

__all__ = [
    "observe_input_reshard",
    "Action",
    "ComputationType",
    "FORWARD",
    "FULL_BACKWARD",
    "RecvInfo",
    "TORCH_VERSION",
    "add_reduce_grad",
    "assert_async",
    "add_send_recv",
    "batch_p2p",
    "format_pipeline_order",
    "initialize_stage",
    "simulate_comms_compute",
    "validate_schedule",
    "wait_batch_p2p",
    "peer_global_rank",
    "single_schedule_order",
]

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

Action = _schedules._Action
ComputationType = _schedules._ComputationType
FORWARD = _schedules._ComputationType.FORWARD
FULL_BACKWARD = _schedules._ComputationType.FULL_BACKWARD
RecvInfo = _stage._RecvInfo

batch_p2p = _schedules._batch_p2p
wait_batch_p2p = _schedules._wait_batch_p2p
add_reduce_grad = _schedules._add_reduce_grad
add_send_recv = _schedules._add_send_recv
validate_schedule = _schedules._validate_schedule
simulate_comms_compute = _schedules._simulate_comms_compute
format_pipeline_order = _schedules._format_pipeline_order

_INIT_TAKES_TARGET = "target" in inspect.signature(
    _schedules.PipelineScheduleSingle._initialize_stage
).parameters


def initialize_stage(schedule: Any, args: Any, kwargs: Any, target: Any, loss_kwargs: Any) -> None:
    """``PipelineScheduleSingle._initialize_stage`` across torch versions.

    2.13 runs metadata inference with the loss (it takes target and loss kwargs);
    2.11 infers shapes from a forward only.
    """
    if _INIT_TAKES_TARGET:
        schedule._initialize_stage(args, kwargs, target, loss_kwargs)
    else:
        schedule._initialize_stage(args, kwargs)


def single_schedule_order(schedule: Any) -> dict[int, list]:
    """A ``PipelineScheduleSingle``'s IR (``_get_pipeline_order``), ``{}`` where it has none."""
    return schedule._get_pipeline_order() or {}


def peer_global_rank(stage: Any, stage_index: int) -> int:
    """Global rank of the process that holds ``stage_index`` in ``stage``'s group."""
    group = stage.group or dist.distributed_c10d._get_default_group()
    return dist.get_global_rank(group, stage.stage_index_to_group_rank[stage_index])


# --------------------------------------------------------------------------------------
# Tensor-parallel input resharding (pipelining_seq.parallel): what it saves.
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def observe_input_reshard(callback: Any) -> Iterator[None]:
    """Call ``callback(tensor)`` for every slice ``input_reshard`` saves instead of a
    gathered input (memory calibration). Its saved-tensor hooks are innermost, so an
    outer ``saved_tensors_hooks`` never sees those tensors; this patches torch's private
    ``_pack_hook_tp`` for the duration of the ``with`` block."""
    import torch.distributed.tensor.parallel.input_reshard as mod

    orig = mod._pack_hook_tp

    def hook(mesh: Any, dim: int, x: Any) -> Any:
        out = orig(mesh, dim, x)
        if out is not x:
            callback(out)
        return out

    mod._pack_hook_tp = hook
    try:
        yield
    finally:
        mod._pack_hook_tp = orig


# --------------------------------------------------------------------------------------
# Input checks that must not synchronise the device (torchtitan integration).
# --------------------------------------------------------------------------------------


def assert_async(cond: torch.Tensor, msg: str) -> None:
    """``torch._assert_async``: raise where ``cond`` is false, without a host sync on CUDA."""
    torch._assert_async(cond, msg)
