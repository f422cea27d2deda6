"""Every private torch API the package uses is declared here.

torch.distributed.pipelining keeps its schedule IR (``_Action``), its p2p helpers and
its simulator private, and their signatures move between releases (2.11 and 2.13 differ
in ``_initialize_stage``, ``_maybe_compute_loss`` and metadata inference). Three kinds of
use, each declared once:

* names imported or called: the aliases and wrappers below;
* hooks the package's subclasses override (:data:`OVERRIDDEN_HOOKS`): every subclass
  calls :func:`check_overrides` when it is defined, which raises if torch no longer has a
  declared hook (the override would silently stop applying) or if the subclass overrides
  a private torch method that is not declared here;
* private state the subclasses read (:data:`READ_STATE`), checked by
  ``tests/unit/test_compat.py`` on real instances.

A torch upgrade therefore breaks in this module, loudly, and nowhere else.
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
from torch.utils._pytree import tree_leaves

__all__ = [
    "observe_input_reshard",
    "timed_p2p_waits",
    "Action",
    "ComputationType",
    "FORWARD",
    "FULL_BACKWARD",
    "BACKWARD_INPUT",
    "BACKWARD_WEIGHT",
    "REDUCE_GRAD",
    "PipelineScheduleRuntime",
    "RecvInfo",
    "TORCH_VERSION",
    "add_reduce_grad",
    "add_unshard_reshard",
    "assert_async",
    "add_send_recv",
    "batch_p2p",
    "format_pipeline_order",
    "initialize_stage",
    "simulate_comms_compute",
    "validate_schedule",
    "wait_batch_p2p",
    "peer_global_rank",
    "register_action_function",
    "set_lr_scheduler_step",
    "single_schedule_order",
    "schedule_ops",
    "runtime_step_microbatches",
    "OVERRIDDEN_HOOKS",
    "READ_STATE",
    "check_overrides",
    "default_group",
    "local_tensor",
    "OP_TYPES",
    "SDPA_C",
    "has_compiled_module",
    "dynamo_reset",
    "set_available_device",
    "flash_attention_ops",
    "efficient_attention_ops",
    "tree_leaves",
    "is_compiled_module",
    "traced_stage_kind",
]

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

Action = _schedules._Action
ComputationType = _schedules._ComputationType
FORWARD = _schedules._ComputationType.FORWARD
FULL_BACKWARD = _schedules._ComputationType.FULL_BACKWARD
BACKWARD_INPUT = _schedules._ComputationType.BACKWARD_INPUT
BACKWARD_WEIGHT = _schedules._ComputationType.BACKWARD_WEIGHT
REDUCE_GRAD = _schedules._ComputationType.REDUCE_GRAD
# The action-list executor behind torch's interleaved and zero-bubble schedules; the
# Seq1F1B-I and Seq1F1B-ZB schedules subclass it and hand it their own compute IR.
PipelineScheduleRuntime = _schedules._PipelineScheduleRuntime
RecvInfo = _stage._RecvInfo

batch_p2p = _schedules._batch_p2p
wait_batch_p2p = _schedules._wait_batch_p2p
add_reduce_grad = _schedules._add_reduce_grad
add_unshard_reshard = _schedules._add_unshard_reshard
add_send_recv = _schedules._add_send_recv
validate_schedule = _schedules._validate_schedule
simulate_comms_compute = _schedules._simulate_comms_compute
format_pipeline_order = _schedules._format_pipeline_order

# tree_leaves (torch's private pytree helper, imported above): the leaves of a nested
# output (pipelining_seq.losses).


def flash_attention_ops(device_type: str) -> tuple[Any, Any]:
    """The forward and backward aten flash-attention kernels that return the log-sum-exp
    (pipelining_seq.kernels): the CPU ones, or the CUDA ones."""
    aten = torch.ops.aten
    if device_type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    return aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward


def efficient_attention_ops() -> tuple[Any, Any]:
    """torch's memory-efficient attention kernels (CUDA), which take an additive bias and
    return the log-sum-exp (pipelining_seq.kernels, masked and float32 tiles). Same schema
    in torch 2.11 and 2.13:

    ``_scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp,
    dropout_p=0., is_causal=False, *, scale=None) -> (output, log_sumexp, philox_seed, philox_offset)``;
    ``_scaled_dot_product_efficient_attention_backward(grad_out_, query, key, value, attn_bias, out,
    logsumexp, philox_seed, philox_offset, dropout_p, grad_input_mask, is_causal=False, *, scale=None)
    -> (grad_query, grad_key, grad_value, grad_attn_bias)``.
    """
    aten = torch.ops.aten
    return aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_efficient_attention_backward


# Attention guard (pipelining_seq.guard): the types of ``torch.ops`` callables, which
# reach a TorchFunctionMode as themselves, and SDPA's C entry point (the same kernel as
# F.scaled_dot_product_attention, reachable without going through F).
OP_TYPES = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
SDPA_C = torch._C._nn.scaled_dot_product_attention



def has_compiled_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a submodule runs through torch.compile (``Module.compile()``
    sets the private ``_compiled_call_impl``; ``torch.compile(module)`` wraps it)."""
    return any(is_compiled_module(m) for m in module.modules())


def is_compiled_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself runs through torch.compile (its hooks and submodules run
    inside the compiled graph)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def traced_stage_kind(stage: Any) -> str | None:
    """How ``stage`` came from torch's tracer front end (``pipeline(...)`` then
    ``pipe.build_stage(...)``), or None for a stage built by hand.

    The tracer's stage class is the private ``_PipelineStage``, which keeps a
    ``pipe_info`` (a ``PipeInfo``); its module is an ``fx.GraphModule`` exported by
    ``torch.export`` (placeholders carry the traced example values in ``meta["val"]``,
    submodules are ``InterpreterModule``), also when re-wrapped in another stage class.
    """
    from torch.distributed.pipelining._utils import PipeInfo

    if isinstance(getattr(stage, "pipe_info", None), PipeInfo) or type(stage).__name__ == "_PipelineStage":
        return "pipe.build_stage(...) returned torch's _PipelineStage"
    module = getattr(stage, "submod", None)
    if isinstance(module, torch.fx.GraphModule):
        try:
            from torch.export.unflatten import InterpreterModule
        except ImportError:  # pragma: no cover - older torch
            InterpreterModule = ()  # noqa: N806
        exported = any(n.op == "placeholder" and "val" in n.meta for n in module.graph.nodes)
        if exported or any(isinstance(m, InterpreterModule) for m in module.modules()):
            return "its module is a GraphModule from pipeline(...) / torch.export"
    return None


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


def schedule_ops(cls: type, pp: int, n_microbatches: int, stages_per_rank: int) -> list[list]:
    """Every rank's ``_Action`` IR of torch schedule class ``cls``, built by torch's own
    schedule visualizer on mock stages (no process group)."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    return get_schedule_ops(cls, pp, n_microbatches, num_stages_per_rank=stages_per_rank)


def default_group() -> dist.ProcessGroup:
    """The default process group (what a stage's ``group=None`` means)."""
    return dist.distributed_c10d._get_default_group()


def register_action_function(schedule: Any, computation_type: Any, fn: Any) -> None:
    """``_PipelineScheduleRuntime.register_custom_function`` (run ``fn(action, ctx)``
    instead of the runtime's own handling of ``computation_type``)."""
    register = getattr(schedule, "register_custom_function", None)
    if register is None:
        raise RuntimeError(
            f"torch {torch.__version__}: _PipelineScheduleRuntime has no register_custom_function, "
            "which the Seq1F1B-I/ZB schedules need for their gradient scaling: upgrade torch"
        )
    register(computation_type, fn)


_RUNTIME_STEP_TAKES_LOSS_KWARGS = "loss_kwargs" in inspect.signature(
    _schedules._PipelineScheduleRuntime._step_microbatches
).parameters


def runtime_step_microbatches(
    schedule: Any, arg_mbs: Any, kwarg_mbs: Any, target_mbs: Any, losses: Any, return_outputs: bool, loss_kwargs: Any
) -> None:
    """``_PipelineScheduleRuntime._step_microbatches`` across torch versions (2.11 has no
    ``loss_kwargs``: refused there when given, rather than dropped)."""
    if _RUNTIME_STEP_TAKES_LOSS_KWARGS:
        schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs)
        return
    if loss_kwargs:
        raise TypeError(
            f"torch {torch.__version__}'s action runtime takes no loss_kwargs (got {sorted(loss_kwargs)}): "
            "upgrade torch (>= 2.13) or fold them into loss_fn"
        )
    schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs)


def peer_global_rank(stage: Any, stage_index: int) -> int:
    """Global rank of the process that holds ``stage_index`` in ``stage``'s group."""
    return dist.get_global_rank(stage.group or default_group(), stage.stage_index_to_group_rank[stage_index])


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------------------
# Private hooks overridden, and private state read, by the package's subclasses.
# --------------------------------------------------------------------------------------

OVERRIDDEN_HOOKS: dict[str, tuple[tuple[str, ...], ...]] = {
    # torch base class -> groups of hook names; each group must have at least one name in
    # the installed torch (a group lists the spellings of one hook across versions).
    "PipelineScheduleSingle": (
        ("_step_microbatches",), ("_maybe_compute_loss",), ("_update_losses",), ("_get_pipeline_order",),
    ),
    "PipelineScheduleRuntime": (("_maybe_compute_loss",), ("_update_losses",)),
    # 2.11 validates inputs/outputs with _validate_fwd_input/_validate_fwd_outputs; 2.13
    # moved both checks into _validate_stage_tensors.
    "PipelineStage": (
        ("_validate_stage_tensors", "_validate_fwd_input", "_validate_fwd_outputs"),
        # Public name, declared because forward_one_chunk's call to it is how the stage
        # sees a unit's composite inputs (the chunk-exactness check records them there).
        ("forward_maybe_with_nosync",),
    ),
}

READ_STATE: dict[str, tuple[str, ...]] = {
    # torch base class -> private attributes and methods the subclasses read or call.
    "PipelineScheduleSingle": (
        "_stage", "_num_stages", "_n_microbatches", "_loss_fn", "_has_backward", "_internal_losses",
        "_args_chunk_spec", "_kwargs_chunk_spec", "_check_inputs", "_maybe_get_loss", "_merge_outputs",
        "_initialize_stage",
    ),
    "PipelineScheduleRuntime": (
        "_stages", "_num_stages", "_n_microbatches", "_loss_fn", "_has_backward", "_internal_losses",
        "_args_chunk_spec", "_kwargs_chunk_spec", "_merge_outputs", "_prepare_schedule_with_comms",
        "_step_microbatches",
    ),
    "PipelineStage": ("args_recv_info", "grad_recv_info", "stage_index_to_group_rank"),
}

_TORCH_BASES = {
    "PipelineScheduleSingle": _schedules.PipelineScheduleSingle,
    "PipelineScheduleRuntime": _schedules._PipelineScheduleRuntime,
    "PipelineStage": _stage.PipelineStage,
}


def check_overrides(cls: type) -> type:
    """Raise ``RuntimeError`` if ``cls`` (or a mixin of the package it inherits) overrides an
    undeclared private torch method, or if a declared hook it overrides is gone from the
    installed torch. Returns ``cls``."""
    for base_name, groups in OVERRIDDEN_HOOKS.items():
        base = _TORCH_BASES[base_name]
        if not issubclass(cls, base):
            continue
        declared = {name for group in groups for name in group}
        # Every class between cls and torch's own: the package's subclasses and mixins.
        own = [k for k in cls.__mro__ if not k.__module__.startswith(("torch.", "builtins", "typing"))]
        overridden = {name: value for k in own for name, value in vars(k).items()}
        for name, value in overridden.items():
            method = inspect.isfunction(value) or isinstance(value, (property, staticmethod, classmethod))
            if method and name.startswith("_") and not name.startswith("__") and hasattr(base, name) and name not in declared:
                raise RuntimeError(
                    f"{cls.__name__} overrides torch's private {base_name}.{name}, which pipelining_seq._compat "
                    "does not declare: add it to OVERRIDDEN_HOOKS"
                )
        for group in groups:
            if any(name in overridden for name in group) and not any(hasattr(base, name) for name in group):
                raise RuntimeError(
                    f"torch {torch.__version__} has no {base_name}.{' / '.join(group)}: {cls.__name__}'s override "
                    "would silently stop applying; pipelining_seq does not support this torch version yet"
                )
    return cls


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


@contextlib.contextmanager
def timed_p2p_waits(on_wait: Any) -> Iterator[None]:
    """Call ``on_wait(seconds)`` after every wait on a batch of pipeline sends/receives:
    torch's schedules (their private ``_wait_batch_p2p``) and this package's
    (:func:`pipelining_seq.p2p.wait`). Benchmarks only (step-time breakdown)."""
    import time

    from . import p2p

    orig_torch, orig_ours = _schedules._wait_batch_p2p, p2p._wait_works

    def wrap(fn: Any) -> Any:
        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                on_wait(time.perf_counter() - t0)
        return timed

    _schedules._wait_batch_p2p = wrap(orig_torch)
    p2p._wait_works = wrap(orig_ours)
    try:
        yield
    finally:
        _schedules._wait_batch_p2p = orig_torch
        p2p._wait_works = orig_ours


# --------------------------------------------------------------------------------------
# LR schedulers (checkpoint resume).
# --------------------------------------------------------------------------------------


def set_lr_scheduler_step(sched: Any, step: int) -> None:
    """Put a ``LambdaLR`` at ``step`` scheduler steps without stepping it: each group's lr
    becomes ``base_lr * lambda(step)``, as after ``step`` calls of ``sched.step()``.
    Sets the private ``_last_lr`` that ``get_last_lr`` reads."""
    sched.last_epoch = step
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(step)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


# --------------------------------------------------------------------------------------
# Input checks that must not synchronise the device (torchtitan integration).
# --------------------------------------------------------------------------------------


def assert_async(cond: torch.Tensor, msg: str) -> None:
    """``torch._assert_async``: raise where ``cond`` is false, without a host sync on CUDA."""
    torch._assert_async(cond, msg)


# --------------------------------------------------------------------------------------
# torchtitan on CPU: its device pick and the compile probe's cleanup.
# --------------------------------------------------------------------------------------


def dynamo_reset() -> None:
    """``torch._dynamo.reset()``: drop compiled code (after the torchtitan compile probe)."""
    torch._dynamo.reset()


def set_available_device(device_type: str, device_module: Any) -> None:
    """Make ``torch._utils._get_available_device_type()`` return ``device_type`` and
    ``torch._utils._get_device_module(device_type)`` return ``device_module``.

    torchtitan 0.3 picks ``_get_available_device_type() or "cuda"`` as its device when its
    modules are imported, and asks ``_get_device_module`` for device names, memory figures
    and ``current_device()``; on a CPU-only machine the answer would be cuda."""
    import torch._utils as utils

    original = utils._get_device_module
    utils._get_available_device_type = lambda: device_type
    utils._get_device_module = lambda kind="cuda": device_module if kind == device_type else original(kind)
