"""Refuse attention that bypasses ChunkedCausalAttention inside a chunked unit.

A model that calls ``F.scaled_dot_product_attention(is_causal=True)`` itself still runs
under ``ScheduleSeq1F1B(n_seq_chunks > 1)``, but each chunk then attends only to its own
tokens: the losses are plausible and wrong. While a stage runs a unit of a step cut into
more than one chunk, :func:`chunked_unit` pushes a ``TorchFunctionMode`` that raises
:class:`~pipelining_seq.ContractError` for any attention kernel not called by
``ChunkedCausalAttention``: ``F.scaled_dot_product_attention``, flex attention, torch's
``_scaled_dot_product_*`` ops and flash-attn's ops. Nothing is pushed outside units or
when a micro-batch is one chunk, and the mode's per-call work is one set lookup.

``ChunkedCausalAttention`` has no dropout; attention dropout anywhere else in a chunked
unit arrives through one of the refused calls.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _compat
from .context import ContractError

__all__ = ["allow_attention", "chunked_unit"]

_STATE = threading.local()
_OP_TYPES = _compat.OP_TYPES
_OP_WORDS = ("scaled_dot_product", "flash_attn", "flex_attention", "flash_attention")


def _watched() -> frozenset:
    funcs: set[Any] = {F.scaled_dot_product_attention, _compat.SDPA_C}
    try:
        from torch.nn.attention import flex_attention as _flex

        funcs.add(_flex.flex_attention)
    except ImportError:  # pragma: no cover - older torch
        pass
    return frozenset(funcs)


_WATCHED = _watched()


def _allowed() -> bool:
    return getattr(_STATE, "allowed", 0) > 0


@contextlib.contextmanager
def allow_attention() -> Iterator[None]:
    """Mark attention calls made inside as coming from ChunkedCausalAttention."""
    _STATE.allowed = getattr(_STATE, "allowed", 0) + 1
    try:
        yield
    finally:
        _STATE.allowed -= 1


def _name(func: Any) -> str:
    if isinstance(func, _OP_TYPES):
        return f"torch.ops.{func}"
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


class _AttentionGuard(TorchFunctionMode):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _WATCHED or (isinstance(func, _OP_TYPES) and any(w in str(func) for w in _OP_WORDS)):
            if not _allowed():
                msg = (
                    f"{_name(func)} called inside {self.where} of a step cut into sequence chunks: "
                    "a chunk would attend only to itself and the result would be silently wrong. "
                    "Call pipelining_seq.ChunkedCausalAttention()(q, k, v) for causal attention "
                    "(document_ids=... for packed documents), or use n_seq_chunks=1"
                )
                raise ContractError(msg)
        return func(*args, **(kwargs or {}))


_MARK = "of a step cut into sequence chunks"
_QUOTED = re.compile(r"ContractError\(['\"](.*?" + _MARK + r".*?)['\"]\)", re.S)


def _refusal_in(e: BaseException | None) -> str | None:
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, ContractError) and _MARK in str(e):
            return str(e)
        found = _QUOTED.search(str(e))
        if found:
            return found.group(1)
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _contract_error_in(e: BaseException | None) -> ContractError | None:
    """The first ContractError instance in ``e``'s chain (torch wraps forward errors)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, ContractError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _names_contract_error(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 8:
        if "ContractError" in type(e).__name__ or "ContractError" in str(e)[:500]:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


@contextlib.contextmanager
def chunked_unit(*, n_chunks: int, where: str) -> Iterator[None]:
    """Guard the enclosed unit when its micro-batch is cut into more than one chunk."""
    if n_chunks <= 1:
        yield
        return
    try:
        with _AttentionGuard(where):
            yield
    except Exception as e:
        # Eager flex attention runs through torch.compile, which reports the refusal
        # inside its own error type; give the caller the refusal. A ContractError raised
        # by the model's own contract checks (ChunkedCausalAttention shared by several
        # layers, ...) keeps its message: the stage unwraps it from torch's RuntimeError.
        refused = None if isinstance(e, ContractError) else _refusal_in(e)
        if refused is None and _contract_error_in(e) is not None:
            raise
        if refused is None and not isinstance(e, ContractError) and _names_contract_error(e):
            # torch < 2.13 drops the message when it re-raises from a compiled region.
            refused = (
                f"an attention kernel run through torch.compile (flex_attention) was called inside {where} "
                f"{_MARK}: a chunk would attend only to itself and the result would be silently wrong. Call "
                "pipelining_seq.ChunkedCausalAttention()(q, k, v) (document_ids=... for packed documents), "
                "or use n_seq_chunks=1"
            )
        if refused is not None:
            raise ContractError(refused) from e
        raise
