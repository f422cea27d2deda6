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
    "torch_schedule_actions",
    "torch_schedule_class",
    "torch_schedule_names",
    "torch_schedule_stages",
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
    return out, lse, None


def _cpu_backward(dout, q, k, v, out, lse, aux, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _cuda_forward(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale
    )
    # cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused: handed back to the backward
    # exactly as torch's own autograd formula does.
    return res[0], res[1], res[2:8]


def _cuda_backward(dout, q, k, v, out, lse, aux, causal, scale):
    cum_q, cum_k, max_q, max_k, rng_state, unused = aux
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused,
        scale=scale,
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
    return (p.to(v.dtype) @ v), lse, None


def _math_backward(dout, q, k, v, out, lse, aux, causal, scale):
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
    """(out, lse, aux) of softmax attention on [B, H, L, D] tensors.

    ``causal`` is only used on square blocks, where top-left and bottom-right alignment
    agree. ``aux`` is kernel state that ``flash_backward`` must get back.
    """
    return _FORWARD[_fused_kernel(q)](q, k, v, causal, scale)


def flash_backward(dout, q, k, v, out, lse, aux, *, causal: bool, scale: float):
    """(dq, dk, dv) of one block, given the *merged* output and logsumexp of all blocks."""
    return _BACKWARD[_fused_kernel(q)](dout, q, k, v, out, lse, aux, causal, scale)


# --------------------------------------------------------------------------------------
# torch's own schedules as plain action lists (for the simulator and the benchmarks).
# --------------------------------------------------------------------------------------

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
            ir = sched._get_pipeline_order() or {}
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
