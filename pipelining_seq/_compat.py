"""Every use of a private torch API lives here.

torch.distributed.pipelining keeps its schedule IR (``_Action``), its p2p helpers and
its simulator private, and their signatures move between releases (2.11 and 2.13 differ
in ``_initialize_stage``, ``_maybe_compute_loss`` and metadata inference). Keeping the
imports in one module means a torch upgrade breaks in one place, and
``tests/test_compat.py`` fails loudly when a signature moves.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as _schedules
from torch.distributed.pipelining import stage as _stage

__all__ = [
    "Action",
    "ComputationType",
    "FORWARD",
    "FULL_BACKWARD",
    "RecvInfo",
    "TORCH_VERSION",
    "add_reduce_grad",
    "add_send_recv",
    "batch_p2p",
    "format_pipeline_order",
    "initialize_stage",
    "simulate_comms_compute",
    "validate_schedule",
    "wait_batch_p2p",
    "peer_global_rank",
    "flash_forward",
    "flash_backward",
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


def peer_global_rank(stage: Any, stage_index: int) -> int:
    """Global rank of the process that holds ``stage_index`` in ``stage``'s group."""
    group = stage.group or dist.distributed_c10d._get_default_group()
    return dist.get_global_rank(group, stage.stage_index_to_group_rank[stage_index])


# --------------------------------------------------------------------------------------
# Attention kernels that return (output, logsumexp) and take them back in backward.
# --------------------------------------------------------------------------------------


def _cpu_forward(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _cuda_forward(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale
    )
    return res[0], res[1]


def _cuda_backward(dout, q, k, v, out, lse, causal, scale):
    lq, lk = q.shape[-2], k.shape[-2]
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    # Without dropout the philox seed/offset are never read; any tensors do.
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, empty, empty, lq, lk, 0.0, causal, seed, seed, scale=scale
    )


def _math_forward(q, k, v, causal, scale):
    # Reference path for dtypes/devices without a fused kernel (e.g. CUDA float32).
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q @ k.transpose(-2, -1)).to(work) * scale
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    return (p.to(v.dtype) @ v), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    scores = (q @ k.transpose(-2, -1)).to(lse.dtype) * scale
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.exp(scores - lse.unsqueeze(-1))
    dv = p.to(dout.dtype).transpose(-2, -1) @ dout
    dp = (dout @ v.transpose(-2, -1)).to(lse.dtype)
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = ds.to(q.dtype) @ k
    dk = ds.to(q.dtype).transpose(-2, -1) @ q
    return dq, dk, dv


def _fused_kernel(q: torch.Tensor) -> str:
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return "cuda"
    return "math"


_FORWARD = {"cpu": _cpu_forward, "cuda": _cuda_forward, "math": _math_forward}
_BACKWARD = {"cpu": _cpu_backward, "cuda": _cuda_backward, "math": _math_backward}


def flash_forward(q, k, v, *, causal: bool, scale: float):
    """(out, lse) of softmax attention on [B, H, L, D] tensors; ``causal`` on a square block."""
    return _FORWARD[_fused_kernel(q)](q, k, v, causal, scale)


def flash_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    """(dq, dk, dv) of one block, given the *merged* output and logsumexp of all blocks."""
    return _BACKWARD[_fused_kernel(q)](dout, q, k, v, out, lse, causal, scale)
