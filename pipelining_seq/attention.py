"""Causal attention that runs exactly over sequence chunks, with packed documents.

``ChunkedCausalAttention`` is the one module a model needs to become Seq1F1B-ready.
Inside a Seq1F1B stage, chunk j's queries attend to the cached K/V of chunks 0..j-1 of
the same micro-batch plus its own (bottom-right causal). The cached K/V enter as
detached data, and the gradients chunk j computes for them are kept in the cache until
chunk i's own backward adds them in: each unit's autograd graph is independent, which
is what lets the pipeline runtime call backward once per unit.

With ``document_ids`` (``[batch, seq]`` integers, one id per token; packed documents),
a token attends to earlier-or-equal tokens of its own document only, cached chunks
included (the cache keeps their ids). With ``window=w`` (sliding-window attention), the
query at position ``i`` sees the key at position ``j`` only if ``0 <= i - j < w``
(Hugging Face's convention; composed with documents); positions are absolute, so the
window reaches back into cached chunks exactly as on the whole sequence. ``v`` may have a different head size than ``q``
and ``k`` (MLA), and fewer heads than ``q`` (grouped-query attention), on every backend.

Backends:

``blockwise`` (default)
    One kernel call per earlier chunk and one causal call on the chunk's own square
    block, merged by log-sum-exp; the backward replays the same blocks against the
    merged output. With document ids or a window, cached blocks no query can reach are
    skipped and only tiles that straddle a document or window boundary get a mask
    (:mod:`pipelining_seq.blockwise`). Only one copy of each chunk's K/V is kept. Under
    ``torch.compile`` it runs as an opaque custom op.
``sdpa``
    Concatenate cached and own K/V and call ``scaled_dot_product_attention`` with
    ``causal_lower_right`` (``is_causal`` on chunk 0; an explicit mask with documents).
    (an explicit mask with a window too). Simple and kernel-agnostic, but every chunk's
    SDPA saves its own concatenation:
    (k+1)/2 copies of K/V. Eager only.
``flash``
    Like ``sdpa`` with flash-attn's ``flash_attn_func(causal=True)``, whose causal mask
    is bottom-right aligned; with documents ``flash_attn_varlen_func``, one segment per
    (row, document), which needs each document to be one contiguous run of tokens; a window
    is flash-attn's ``window_size=(w - 1, 0)``. CUDA and fp16/bf16 only. Eager only.

Outside a pipeline all backends are plain causal (block-causal with ``document_ids``,
windowed with ``window``) ``scaled_dot_product_attention`` on the whole sequence.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .blockwise import BlockwiseChunkAttention, compiled_chunk_attention, unit_layer
from .context import ContractError, _LayerKV, _UnitFlag, current_chunk
from .guard import allow_attention

__all__ = ["ChunkedCausalAttention", "check_document_ids", "flash_attn_available"]

Backend = Literal["auto", "blockwise", "sdpa", "flash"]

_LAYER_KEYS = itertools.count(1)

try:  # optional dependency
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = _flash_attn_varlen_func = None


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def check_document_ids(ids: object, *, batch: int | None = None, what: str = "document_ids") -> None:
    """Raise ContractError unless ``ids`` is an integer tensor [batch, seq]."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
            or ids.dtype == torch.bool:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ContractError(f"{what} must be an integer tensor [batch, seq], got {got}")
    if ids.dim() != 2 or (batch is not None and ids.shape[0] != batch):
        raise ContractError(
            f"{what} has shape {tuple(ids.shape)}, expected [batch, seq]"
            + (f" with batch {batch} (the inputs')" if batch is not None else "")
        )


def document_mask(ids_q: torch.Tensor, ids_k: torch.Tensor) -> torch.Tensor:
    """bool [batch, 1, Lq, Lk]: same document and key not after query (bottom-right)."""
    lq, lk = ids_q.shape[1], ids_k.shape[1]
    causal = torch.ones(lq, lk, dtype=torch.bool, device=ids_q.device).tril(lk - lq)
    return ((ids_q[:, :, None] == ids_k[:, None, :]) & causal).unsqueeze(1)


def window_mask(lq: int, lk: int, window: int, device: torch.device,
                ids_q: torch.Tensor | None = None, ids_k: torch.Tensor | None = None) -> torch.Tensor:
    """bool [batch or 1, 1, Lq, Lk]: ``0 <= i - j < window`` with the queries the last
    ``Lq`` of ``Lk`` positions (bottom-right), and the same document when ids are given."""
    qpos = torch.arange(lk - lq, lk, device=device)[:, None]
    dist = qpos - torch.arange(lk, device=device)[None, :]
    mask = ((dist >= 0) & (dist < window))[None, None]
    if ids_q is not None:
        mask = mask & (ids_q[:, :, None] == ids_k[:, None, :]).unsqueeze(1)
    return mask


def check_window(window: object) -> int | None:
    """``window`` as an int (None: no window); ValueError unless a positive integer."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"ChunkedCausalAttention(window={window!r}): the window must be a positive integer "
            "(keys j with 0 <= i - j < window are visible to query i) or None for full causal attention"
        )
    return window


class _KVRelay(torch.autograd.Function):
    """Returns [cached K of chunks < j ; own K] detached; relays the prefix gradient."""

    @staticmethod
    def forward(ctx, x, kv: _LayerKV, j: int, which: str):
        ctx.kv, ctx.j, ctx.which = kv, j, which
        ctx.offset = sum(t.shape[2] for t in getattr(kv, which)[:j])
        return torch.cat(getattr(kv, which)[: j + 1], dim=2) if j else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        kv, j, which, offset = ctx.kv, ctx.j, ctx.which, ctx.offset
        grads = getattr(kv, "d" + which)
        if kv.pending_after(which, j):
            raise ContractError(
                f"backward of chunk {j} ran before chunk {j + 1}'s: Seq1F1B needs "
                "backwards in reverse chunk order within a micro-batch"
            )
        if grads[j] is not None:  # the prefix gradient left by chunk j+1
            g = g + grads[j]
        kv.mark_done(which, j)
        if not kv.keep:
            getattr(kv, which)[j] = None
            if which == "k":
                kv.ids[j] = None
        grads[j] = None
        if j:
            grads[j - 1] = g[:, :, :offset]
        return g[:, :, offset:], None, None, None


def _flash_varlen(q, k, v, ids_q, ids_k, scale, window_kw=None):
    """flash-attn varlen over (row, document) segments; q [B,Lq,H,D], k/v [B,Lk,Hkv,D]."""
    b, lq = ids_q.shape
    lk = ids_k.shape[1]
    off = lk - lq
    # Each document must be one run: an id seen again after a change is refused.
    change_k = torch.ones_like(ids_k, dtype=torch.bool)
    change_k[:, 1:] = ids_k[:, 1:] != ids_k[:, :-1]
    for row in range(b):
        if int(change_k[row].sum()) != ids_k[row].unique().numel():
            raise ContractError(
                "ChunkedCausalAttention(backend='flash') with document_ids needs every document to be "
                f"one contiguous run of tokens (row {row} is not); use backend='blockwise' for other layouts"
            )
    cu_q, cu_k, key_rows = [0], [0], []
    max_q = max_k = 0
    for row in range(b):
        starts = change_k[row].nonzero().flatten().tolist() + [lk]
        for s, e in zip(starts[:-1], starts[1:]):
            qs, qe = max(s, off) - off, e - off  # the document's queries in this chunk
            if qe <= 0:
                continue
            cu_q.append(cu_q[-1] + qe - qs)
            cu_k.append(cu_k[-1] + e - s)
            key_rows.append(torch.arange(row * lk + s, row * lk + e, device=k.device))
            max_q, max_k = max(max_q, qe - qs), max(max_k, e - s)
    idx = torch.cat(key_rows)
    kp = k.reshape(b * lk, *k.shape[2:]).index_select(0, idx)
    vp = v.reshape(b * lk, *v.shape[2:]).index_select(0, idx)
    cq = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
    out = _flash_attn_varlen_func(
        q.reshape(b * lq, *q.shape[2:]), kp, vp, cq, ck, max_q, max_k, softmax_scale=scale, causal=True,
        **(window_kw or {}),
    )
    return out.reshape(b, lq, *out.shape[1:])


class ChunkedCausalAttention(nn.Module):
    """Causal softmax attention, exact over Seq1F1B sequence chunks.

    Call as ``attn(q, k, v)`` or ``attn(q, k, v, document_ids=ids)`` with
    ``[batch, heads, seq, head_dim]`` tensors; ``k`` and ``v`` may have fewer heads than
    ``q`` (grouped-query attention) and ``v`` another head size (MLA). Returns
    ``[batch, heads, seq, v_head_dim]``. ``document_ids`` is an integer tensor
    ``[batch, seq]`` for the tokens given (inside a stage: the chunk's); tokens attend
    to earlier-or-equal tokens with the same id only. Use one instance per attention
    layer: the instance is the key under which the layer's K/V are cached.
    Parameter-free.

    Outside a Seq1F1B stage this is plain causal (block-causal) attention, so the same
    model runs unpipelined.

    Args:
        backend: ``"auto"``, ``"blockwise"``, ``"sdpa"`` or ``"flash"`` (see module docs).
            ``"auto"`` picks ``blockwise``.
        scale: softmax scale, default ``1/sqrt(head_dim)`` of q/k.
        window: sliding-window size: query ``i`` sees key ``j`` only if ``0 <= i - j < window``
            (absolute positions, across chunks). None (default): full causal attention.
    """

    def __init__(self, *, backend: Backend = "auto", scale: float | None = None,
                 window: int | None = None) -> None:
        super().__init__()
        if backend not in ("auto", "blockwise", "sdpa", "flash"):
            raise ValueError(
                f"ChunkedCausalAttention(backend={backend!r}): choose one of "
                "'auto', 'blockwise', 'sdpa', 'flash'"
            )
        if backend == "flash" and _flash_attn_func is None:
            raise ValueError(
                "ChunkedCausalAttention(backend='flash') needs flash-attn: "
                "pip install 'pipelining_seq[flash]', or use backend='auto'"
            )
        self.backend = backend
        self.scale = scale
        self.window = check_window(window)
        self._new_key()

    def _new_key(self) -> None:
        # The key of this layer's entries in the K/V cache. The compiled path takes it as
        # a CPU tensor that is no buffer: torch.compile then treats it as a graph input
        # (an int attribute would be a constant, one graph per layer), and .to(device)
        # leaves it alone.
        self._key = next(_LAYER_KEYS)
        self._key_t = torch.tensor(self._key)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A deep copy is another layer: it gets its own key.
        super().__setstate__(state)
        self._new_key()

    def extra_repr(self) -> str:
        return f"backend={self.backend}" + (f", window={self.window}" if self.window is not None else "")

    def _check(self, q, k, v, ids) -> int:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ContractError(
                "ChunkedCausalAttention expects [batch, heads, seq, head_dim] tensors, got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
            raise ContractError(
                "ChunkedCausalAttention: q and k must share batch, seq and head_dim; got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if v.shape[:3] != k.shape[:3]:
            raise ContractError(
                "ChunkedCausalAttention: v must have k's batch, heads and seq (its head_dim may "
                f"differ); got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if q.shape[1] % k.shape[1]:
            raise ContractError(
                f"ChunkedCausalAttention: q has {q.shape[1]} heads, not a multiple of "
                f"k/v's {k.shape[1]} (grouped-query attention needs n_heads % n_kv_heads == 0)"
            )
        if ids is not None:
            check_document_ids(ids, what="ChunkedCausalAttention: document_ids")
            if tuple(ids.shape) != (q.shape[0], q.shape[2]):
                raise ContractError(
                    f"ChunkedCausalAttention: document_ids has shape {tuple(ids.shape)}, expected "
                    f"[batch, seq] = {(q.shape[0], q.shape[2])} for q {tuple(q.shape)}: pass the ids "
                    "of the same tokens (inside a stage, step(document_ids=...) splits them per chunk)"
                )
        return q.shape[1] // k.shape[1]

    @staticmethod
    def _whole(q, k, v, ids, scale, groups, window=None):
        if window is not None:
            s = q.shape[2]
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=window_mask(s, s, window, q.device, ids, ids), scale=scale, enable_gqa=groups > 1
            )
        if ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=document_mask(ids, ids), scale=scale, enable_gqa=groups > 1
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        groups = self._check(q, k, v, document_ids)
        if document_ids is not None:
            document_ids = document_ids.contiguous()
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        backend = "blockwise" if self.backend == "auto" else self.backend
        if torch.compiler.is_compiling():
            if not _UnitFlag.active:
                return self._whole(q, k, v, document_ids, scale, groups, self.window)
            if backend != "blockwise":
                raise ContractError(
                    f"ChunkedCausalAttention(backend={self.backend!r}) cannot run under torch.compile "
                    "inside a Seq1F1B unit: use backend='auto' or 'blockwise'"
                )
            return compiled_chunk_attention(q, k, v, document_ids, self._key_t, scale, groups, self.window or 0)[0]
        ctx = current_chunk()
        if ctx is None:
            return self._whole(q, k, v, document_ids, scale, groups, self.window)
        with allow_attention():
            _, kv, j = unit_layer(q, self._key)
            if j and (document_ids is None) != (kv.ids[0] is None):
                raise ContractError(
                    f"ChunkedCausalAttention: chunk {j} of micro-batch {ctx.microbatch} got "
                    f"document_ids={'None' if document_ids is None else 'a tensor'} but chunk 0 did not "
                    "agree: pass document_ids for every chunk or for none (step(document_ids=...))"
                )
            if backend == "blockwise":
                return BlockwiseChunkAttention.apply(q, k, v, document_ids, kv, j, scale, groups, self.window)
            return self._concat(q, k, v, document_ids, kv, j, scale, groups, backend)

    def _concat(self, q, k, v, ids, kv, j, scale, groups, backend):
        kv.store(j, k.detach(), v.detach(), ids)
        kk = _KVRelay.apply(k, kv, j, "k")
        vv = _KVRelay.apply(v, kv, j, "v")
        ids_k = None if ids is None else torch.cat(kv.ids[: j + 1], dim=1)
        window = self.window
        if backend == "flash":
            d, dv = q.shape[-1], v.shape[-1]
            pad = max(d, dv)
            qt, kt, vt = (_pad_last(t, pad).transpose(1, 2) for t in (q, kk, vv))
            # flash-attn's window is bottom-right aligned and inclusive: i - j <= window - 1.
            wkw = {} if window is None else {"window_size": (window - 1, 0)}
            if ids is None:
                out = _flash_attn_func(qt, kt, vt, causal=True, softmax_scale=scale, **wkw)
            else:
                out = _flash_varlen(qt, kt, vt, ids, ids_k, scale, wkw)
            return out.transpose(1, 2)[..., :dv]
        lq, lk = q.shape[2], kk.shape[2]
        if window is not None:
            return F.scaled_dot_product_attention(
                q, kk, vv, attn_mask=window_mask(lq, lk, window, q.device, ids, ids_k), scale=scale,
                enable_gqa=groups > 1,
            )
        if ids is not None:
            return F.scaled_dot_product_attention(
                q, kk, vv, attn_mask=document_mask(ids, ids_k), scale=scale, enable_gqa=groups > 1
            )
        if lq == lk:
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale, enable_gqa=groups > 1)
        return F.scaled_dot_product_attention(
            q, kk, vv, attn_mask=causal_lower_right(lq, lk), scale=scale, enable_gqa=groups > 1
        )
