"""Deferred weight gradients for split backwards (I then W) without re-walking autograd.

torch's split backward (``stage_backward_input`` / ``stage_backward_weight``) keeps the
whole autograd graph of a unit alive between I and W, walks it in Python for every unit
to find the parameter groups, and runs a second autograd call in W (which, with
activation checkpointing, recomputes the block a second time). The zero-bubble reference
implementations instead let each GEMM layer compute only its input gradient during the
backward and keep what its weight gradient needs (its input and its output gradient) in a
weight-gradient store; W is then a list of plain matrix products.

:class:`WeightGradStore` does that for ``nn.Linear`` modules (the weight-bearing layers of
the reference GPT, torchtitan's models and the transformers models): :meth:`attach`
routes their forward through :class:`_StoreLinear`, whose backward defers the weight
and bias gradients to the store while a unit's backward is being captured
(:meth:`capture`), and computes them immediately otherwise (a plain ``loss.backward()``,
or a full backward). :meth:`take` closes the captured unit and returns its W runner,
which is what torch's ``PipelineStage.dw_builder`` expects.

Gradients of parameters the store does not cover (norms, embeddings, layers other than
``nn.Linear``) are computed during I by the same autograd call, as the reference's store
does: they are cheap next to the GEMMs. A stage with no covered parameter keeps torch's
split backward (:meth:`SequencePipelineStage.use_weight_grad_store` returns False).
Exact: the products are the ones autograd's linear backward runs, only later.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WeightGradStore", "unsupported_reason"]


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a stage module cannot use the store (None when it can).

    Data-parallel wrappers reduce gradients from autograd hooks that the deferred
    products would bypass, and compiled modules would trace the store's Python side
    effects into their backward graph."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    from . import _compat

    if isinstance(module, DistributedDataParallel):
        return "the stage module is wrapped in DistributedDataParallel"
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return "the stage module is sharded with FSDP"
    if _compat.has_compiled_module(module):
        return "the stage module (or a submodule) is compiled"
    return None


def _covered(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (its own forward, a plain-tensor weight that trains)."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    w = module.weight
    return type(w) is nn.Parameter and w.requires_grad


class _Unit:
    """What one unit's W needs: per deferred linear call, (weight, bias, input, output grad)."""

    __slots__ = ("entries", "pending")

    def __init__(self, pending: dict[int, _Unit]) -> None:
        self.entries: list[Any] = []  # (weight, bias, input, output grad) or a callable
        self.pending = pending

    def run(self) -> None:
        entries, self.entries = self.entries, []
        self.pending.pop(id(self), None)
        # In the order the input-gradient pass met them, the order in which a full
        # backward would have accumulated them.
        for entry in entries:
            if callable(entry):  # a layer's own deferred work (WeightGradStore.defer)
                entry()
            else:
                _accumulate(*entry)


def _weight_grads(weight: nn.Parameter | None, bias: nn.Parameter | None, x: torch.Tensor,
                  g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    g2 = g.reshape(-1, g.shape[-1])
    gw = g2.t().mm(x.reshape(-1, x.shape[-1])) if weight is not None else None
    gb = g2.sum(0) if bias is not None else None
    return gw, gb


def _accumulate(weight: nn.Parameter | None, bias: nn.Parameter | None, x: torch.Tensor, g: torch.Tensor) -> None:
    gw, gb = _weight_grads(weight, bias, x, g)
    with torch.no_grad():
        for p, d in ((weight, gw), (bias, gb)):
            if p is None or d is None:
                continue
            if p.grad is None:
                p.grad = d
            else:
                p.grad += d


class _StoreLinear(torch.autograd.Function):
    """``F.linear`` whose backward hands its weight and bias gradients to a store."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                store: WeightGradStore) -> torch.Tensor:
        ctx.store = store
        # The parameters themselves (for .grad), kept outside the saved tensors so that
        # checkpoint recomputation cannot hand back a different object.
        ctx.params = (weight, bias)
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        gx = g.matmul(weight) if ctx.needs_input_grad[0] else None
        w_param = ctx.params[0] if ctx.needs_input_grad[1] else None
        b_param = ctx.params[1] if ctx.params[1] is not None and ctx.needs_input_grad[2] else None
        if w_param is None and b_param is None:
            return gx, None, None, None
        unit = ctx.store._open
        if unit is not None:
            unit.entries.append((w_param, b_param, x, g))
            return gx, None, None, None
        gw, gb = _weight_grads(w_param, b_param, x, g)
        return gx, gw, gb, None


def _store_forward(module: nn.Linear, store: WeightGradStore, x: torch.Tensor) -> torch.Tensor:
    w = module.weight
    if not (torch.is_grad_enabled() and w.requires_grad) or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, w, module.bias)
    return _StoreLinear.apply(x, w, module.bias, store)


class WeightGradStore:
    """The deferred weight gradients of one stage's ``nn.Linear`` layers, per unit."""

    def __init__(self) -> None:
        self._open: _Unit | None = None
        self._pending: dict[int, _Unit] = {}  # taken, W not run yet
        self.modules: list[nn.Module] = []

    def attach(self, root: nn.Module) -> int:
        """Route every covered ``nn.Linear`` under ``root`` through the store; returns how
        many parameters the store now covers (0: nothing to defer)."""
        covered = 0
        for m in root.modules():
            hook = getattr(m, "attach_weight_grad_store", None)
            if callable(hook):  # a layer that defers its own weight work (see defer)
                covered += int(hook(self))
                self.modules.append(m)
                continue
            if not _covered(m) or "forward" in vars(m):
                continue
            m.forward = functools.partial(_store_forward, m, self)
            self.modules.append(m)
            covered += 1 + int(m.bias is not None and m.bias.requires_grad)
        return covered

    def detach(self) -> None:
        """Give the modules their own forward back."""
        for m in self.modules:
            vars(m).pop("forward", None)
        self.modules.clear()

    def covered_parameters(self) -> Iterator[nn.Parameter]:
        """The ``nn.Linear`` weights and biases routed through the store."""
        for m in self.modules:
            if isinstance(m, nn.Linear):
                yield m.weight
                if m.bias is not None:
                    yield m.bias

    def defer(self, fn: Callable[[], None]) -> bool:
        """For layers with their own ``attach_weight_grad_store(store) -> int`` (the number
        of parameters they cover): queue ``fn`` (their weight-gradient work) for the
        unit being captured. Returns False outside :meth:`capture` (run it now)."""
        if self._open is None:
            return False
        self._open.entries.append(fn)
        return True

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Defer the weight gradients of the backward run inside the block."""
        if self._open is not None:
            raise RuntimeError("WeightGradStore.capture: a unit's backward is already being captured")
        self._open = _Unit(self._pending)
        try:
            yield
        finally:
            self._open = None

    def take(self) -> Callable[[], None]:
        """Close the unit being captured and return its W (torch's ``dw_builder`` protocol)."""
        unit = self._open
        if unit is None:
            raise RuntimeError("WeightGradStore.take: called outside capture()")
        self._open = _Unit(self._pending)
        if unit.entries:
            self._pending[id(unit)] = unit
        return unit.run

    def pending_tensors(self) -> Iterator[torch.Tensor]:
        """The inputs and output gradients held for weight passes not run yet (memory meters)."""
        for unit in list(self._pending.values()):
            for entry in unit.entries:
                if not callable(entry):
                    yield entry[2]
                    yield entry[3]

    def clear(self) -> None:
        """Forget the weight passes of an unfinished step."""
        self._pending.clear()
