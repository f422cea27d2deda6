"""The chunk context: what a layer needs to know about the sequence chunk it is running.

A Seq1F1B stage runs its module once per (micro-batch, chunk) unit. Layers that mix
tokens (attention) or need absolute positions (RoPE) read the current unit from here;
outside a pipeline nothing is set and they behave as on a whole sequence.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ChunkContext",
    "ContractError",
    "KVCache",
    "chunk_context",
    "chunk_positions",
    "current_chunk",
]


class ContractError(RuntimeError):
    """A model used the chunked-attention contract in a way Seq1F1B cannot run exactly."""


@dataclass
class _LayerKV:
    """Per-chunk K/V of one attention layer for one micro-batch, plus relayed gradients."""

    k: list[torch.Tensor | None] = field(default_factory=list)
    v: list[torch.Tensor | None] = field(default_factory=list)
    # Gradients that later chunks computed for this chunk's K/V, summed until its own
    # backward runs (LIFO order guarantees they are complete by then).
    dk: list[torch.Tensor | None] = field(default_factory=list)
    dv: list[torch.Tensor | None] = field(default_factory=list)
    # Document ids of each chunk's tokens ([batch, len] integers), None without masking.
    ids: list[torch.Tensor | None] = field(default_factory=list)
    # The blockwise backend's tiles of each chunk (kept for its backward).
    plan: list[Any] = field(default_factory=list)
    # Chunks whose backward has consumed their relayed gradient, per relay ("kv" for the
    # blockwise kernel, "k"/"v" for the concatenating one): the LIFO check reads this.
    done: dict[str, set[int]] = field(default_factory=dict)
    # Keep K/V after a chunk's backward, until the stage drops the micro-batch. A split
    # backward (zero-bubble schedules) runs the weight pass later, and with activation
    # checkpointing that pass recomputes the chunk's attention from these K/V.
    keep: bool = False

    def store(self, j: int, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        if j == len(self.k):
            self.k.append(k)
            self.v.append(v)
            self.dk.append(None)
            self.dv.append(None)
            self.ids.append(ids)
            self.plan.append(None)
        else:
            self.k[j], self.v[j], self.ids[j] = k, v, ids

    def mark_done(self, relay: str, j: int) -> None:
        self.done.setdefault(relay, set()).add(j)

    def pending_after(self, relay: str, j: int) -> bool:
        """Whether a chunk after ``j`` has not yet run its backward."""
        done = self.done.get(relay, set())
        return any(i not in done for i in range(j + 1, len(self.k)))

    def release(self, j: int) -> None:
        self.dk[j] = self.dv[j] = None
        if not self.keep:
            self.k[j] = self.v[j] = self.ids[j] = self.plan[j] = None

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in (*self.k, *self.v, *self.dk, *self.dv):
            if t is not None:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
        return total


class KVCache:
    """K/V of earlier chunks, keyed by micro-batch and attention layer.

    One instance belongs to a stage. A micro-batch's entries are dropped once its
    chunk 0 has run backward (or, in forward-only mode, once its last chunk ran).
    """

    def __init__(self) -> None:
        self._mbs: dict[int, dict[int, _LayerKV]] = {}
        self.keep_until_drop = False
        """Keep each chunk's K/V past its backward until :meth:`drop` (split backward)."""
        # A compiled graph's attention op finds the cache again by this number (an op
        # takes tensors and scalars, not Python objects).
        self.token = next(_TOKENS)
        _CACHES[self.token] = self

    def layer(self, microbatch: int, layer_key: int) -> _LayerKV:
        layers = self._mbs.setdefault(microbatch, {})
        if layer_key not in layers:
            layers[layer_key] = _LayerKV(keep=self.keep_until_drop)
        return layers[layer_key]

    def drop(self, microbatch: int) -> None:
        for kv in self._mbs.pop(microbatch, {}).values():
            # Autograd graphs may still reference the entry: free its tensors now.
            for j in range(len(kv.k)):
                kv.k[j] = kv.v[j] = kv.dk[j] = kv.dv[j] = kv.ids[j] = kv.plan[j] = None

    def clear(self) -> None:
        self._mbs.clear()

    def microbatches(self) -> list[int]:
        return sorted(self._mbs)

    def nbytes(self) -> int:
        """Bytes of cached K/V and relayed gradients currently held."""
        return sum(e.nbytes() for layers in self._mbs.values() for e in layers.values())

    def __len__(self) -> int:
        return len(self._mbs)


_TOKENS = itertools.count(1)
_CACHES: weakref.WeakValueDictionary[int, KVCache] = weakref.WeakValueDictionary()


def cache_by_token(token: int) -> KVCache:
    cache = _CACHES.get(token)
    if cache is None:
        raise ContractError(f"K/V cache {token} no longer exists: a chunk's backward ran after its stage was freed")
    return cache


@dataclass(frozen=True)
class ChunkContext:
    """The (micro-batch, chunk) unit a stage is running."""

    microbatch: int
    """Micro-batch index within the step."""
    chunk: int
    """Chunk index within the micro-batch (0 is the first tokens)."""
    n_chunks: int
    """Number of chunks the micro-batch was cut into."""
    offset: int
    """Absolute position of the chunk's first token."""
    length: int
    """Number of tokens in the chunk."""
    cache: KVCache
    """Where attention layers keep the K/V of earlier chunks."""
    recompute: bool = False
    """True while the stage runs this chunk's backward (activation-checkpoint recompute)."""


_CURRENT: contextvars.ContextVar[ChunkContext | None] = contextvars.ContextVar(
    "pipelining_seq_chunk", default=None
)


class _UnitFlag:
    """Whether a unit is running, as a plain class attribute: torch.compile reads it while
    tracing and guards on it (a context variable it cannot trace), so a compiled block
    has one graph for inside units and one for outside."""

    active: bool = False


def current_chunk() -> ChunkContext | None:
    """The unit being run, or None outside a Seq1F1B stage."""
    return _CURRENT.get()


@contextlib.contextmanager
def chunk_context(ctx: ChunkContext | None) -> Iterator[ChunkContext | None]:
    token = _CURRENT.set(ctx)
    before = _UnitFlag.active
    _UnitFlag.active = ctx is not None
    try:
        yield ctx
    finally:
        _UnitFlag.active = before
        _CURRENT.reset(token)


def chunk_positions(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Absolute positions of the current chunk's tokens, for RoPE or learned positions.

    Inside a Seq1F1B stage this is ``arange(offset, offset + seq_len)``; outside it is
    ``arange(seq_len)``. Under ``torch.compile`` inside a unit it is an opaque op that
    reads the unit when the graph runs (one graph serves every chunk).
    """
    if torch.compiler.is_compiling():
        if not _UnitFlag.active:
            return torch.arange(seq_len, device=device)
        return _positions_op(seq_len, torch.device(device if device is not None else "cpu"))
    ctx = _CURRENT.get()
    if ctx is None:
        return torch.arange(seq_len, device=device)
    if seq_len != ctx.length:
        raise ContractError(
            f"chunk_positions(seq_len={seq_len}) inside chunk {ctx.chunk} of micro-batch "
            f"{ctx.microbatch}, which has {ctx.length} tokens: pass the length of the "
            "sequence dimension the stage received"
        )
    return torch.arange(ctx.offset, ctx.offset + seq_len, device=device)


@torch.library.custom_op("pipelining_seq::chunk_positions", mutates_args=())
def _positions_op(seq_len: int, device: torch.device) -> torch.Tensor:
    return chunk_positions(seq_len, device)


@_positions_op.register_fake
def _(seq_len, device):
    return torch.empty(seq_len, dtype=torch.int64, device=device)
