"""Causal attention that runs exactly over sequence chunks.

``ChunkedCausalAttention`` is the one module a model needs to become Seq1F1B-ready.
Inside a Seq1F1B stage, chunk j's queries attend to the cached K/V of chunks 0..j-1 of
the same micro-batch plus its own (bottom-right causal). The cached K/V enter as
detached data, and the gradients chunk j computes for them are kept in the cache until
chunk i's own backward adds them in: each unit's autograd graph is independent, which
is what lets the pipeline runtime call backward once per unit.

Backends:

``blockwise`` (default where torch has a fused kernel returning the logsumexp)
    Attention over each earlier chunk without a mask, plus causal attention over the
    chunk's own square block, merged by log-sum-exp; the backward replays the same
    blocks against the merged output. Only one copy of each chunk's K/V is kept, and no
    mask is ever materialised.
``sdpa``
    Concatenate cached and own K/V and call ``scaled_dot_product_attention`` with
    ``causal_lower_right`` (``is_causal`` on chunk 0). Simple and kernel-agnostic, but
    every chunk's SDPA saves its own concatenation: (k+1)/2 copies of K/V.
``flash``
    Like ``sdpa`` with flash-attn's ``flash_attn_func(causal=True)``, whose causal mask
    is bottom-right aligned. CUDA and fp16/bf16 only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from . import kernels
from .context import ContractError, _LayerKV, current_chunk

__all__ = ["ChunkedCausalAttention", "flash_attn_available"]

Backend = Literal["auto", "blockwise", "sdpa", "flash"]

try:  # optional dependency
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_heads(g: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return g
    b, h, s, d = g.shape
    return g.view(b, h // groups, groups, s, d).sum(2)


def _accumulate(buf: list, i: int, g: torch.Tensor) -> None:
    buf[i] = g if buf[i] is None else buf[i] + g


class _BlockwiseChunkAttention(torch.autograd.Function):
    """Chunk j's attention over cached K/V blocks 0..j-1 and its own causal block."""

    @staticmethod
    def forward(ctx, q, k, v, kv: _LayerKV, j: int, scale: float, groups: int):
        kv.store(j, k.detach(), v.detach())
        outs, lses, auxes = [], [], []
        for i in range(j + 1):
            o, lse, aux = kernels.flash_forward(
                q, _expand_heads(kv.k[i], groups), _expand_heads(kv.v[i], groups),
                causal=(i == j), scale=scale,
            )
            outs.append(o)
            lses.append(lse)
            auxes.append(aux)
        if j == 0:
            out, lse = outs[0], lses[0]
        else:
            lse = torch.logsumexp(torch.stack(lses), dim=0)
            out = sum(
                torch.exp(l_i - lse).unsqueeze(-1) * o_i.to(lse.dtype)
                for o_i, l_i in zip(outs, lses)
            ).to(q.dtype)
        ctx.save_for_backward(q, out, lse)
        ctx.kv, ctx.j, ctx.scale, ctx.groups, ctx.auxes = kv, j, scale, groups, auxes
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse = ctx.saved_tensors
        kv, j, scale, groups = ctx.kv, ctx.j, ctx.scale, ctx.groups
        if kv.pending_after("kv", j):
            raise ContractError(
                f"backward of chunk {j} ran while a later chunk's backward is still pending: "
                "Seq1F1B needs backwards in reverse chunk order within a micro-batch"
            )
        dout = dout.contiguous()
        dq = None
        dk_own = dv_own = None
        for i in range(j + 1):
            dq_i, dk_i, dv_i = kernels.flash_backward(
                dout, q, _expand_heads(kv.k[i], groups), _expand_heads(kv.v[i], groups),
                out, lse, ctx.auxes[i], causal=(i == j), scale=scale,
            )
            dq = dq_i if dq is None else dq + dq_i
            dk_i, dv_i = _reduce_heads(dk_i, groups), _reduce_heads(dv_i, groups)
            if i < j:
                _accumulate(kv.dk, i, dk_i)
                _accumulate(kv.dv, i, dv_i)
            else:
                dk_own, dv_own = dk_i, dv_i
        if kv.dk[j] is not None:
            dk_own = dk_own + kv.dk[j]
            dv_own = dv_own + kv.dv[j]
        kv.mark_done("kv", j)
        kv.release(j)
        return dq, dk_own, dv_own, None, None, None, None


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
        grads[j] = None
        if j:
            grads[j - 1] = g[:, :, :offset]
        return g[:, :, offset:], None, None, None


class ChunkedCausalAttention(nn.Module):
    """Causal softmax attention, exact over Seq1F1B sequence chunks.

    Call as ``attn(q, k, v)`` with ``[batch, heads, seq, head_dim]`` tensors; ``k`` and
    ``v`` may have fewer heads than ``q`` (grouped-query attention). Returns
    ``[batch, heads, seq, head_dim]``. Use one instance per attention layer: the
    instance is the key under which the layer's K/V are cached. Parameter-free.

    Outside a Seq1F1B stage this is plain causal attention, so the same model runs
    unpipelined.

    Args:
        backend: ``"auto"``, ``"blockwise"``, ``"sdpa"`` or ``"flash"`` (see module docs).
            ``"auto"`` picks ``blockwise``.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
    """

    def __init__(self, *, backend: Backend = "auto", scale: float | None = None) -> None:
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

    def extra_repr(self) -> str:
        return f"backend={self.backend}"

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ContractError(
                "ChunkedCausalAttention expects [batch, heads, seq, head_dim] tensors, got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
            raise ContractError(
                "ChunkedCausalAttention: q, k and v must share batch, seq and head_dim "
                f"(k and v the same shape); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)}"
            )
        if q.shape[1] % k.shape[1]:
            raise ContractError(
                f"ChunkedCausalAttention: q has {q.shape[1]} heads, not a multiple of "
                f"k/v's {k.shape[1]} (grouped-query attention needs n_heads % n_kv_heads == 0)"
            )
        return q.shape[1] // k.shape[1]

    def _resolve_backend(self, q: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "blockwise"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = self._check(q, k, v)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        ctx = current_chunk()
        if ctx is None:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1
            )
        if q.shape[2] != ctx.length:
            raise ContractError(
                f"ChunkedCausalAttention got {q.shape[2]} query tokens inside chunk "
                f"{ctx.chunk} of micro-batch {ctx.microbatch}, which has {ctx.length}: "
                "attention must see the whole chunk the stage received, along dim 2"
            )
        kv = ctx.cache.layer(ctx.microbatch, id(self))
        j = ctx.chunk
        if len(kv.k) != j and not ctx.recompute:
            raise ContractError(
                f"ChunkedCausalAttention instance called with cache of {len(kv.k)} chunks in "
                f"chunk {j} of micro-batch {ctx.microbatch}: use one instance per attention "
                "layer and call it once per forward"
            )
        backend = self._resolve_backend(q)
        if backend == "blockwise":
            return _BlockwiseChunkAttention.apply(q, k, v, kv, j, scale, groups)
        kv.store(j, k.detach(), v.detach())
        kk = _KVRelay.apply(k, kv, j, "k")
        vv = _KVRelay.apply(v, kv, j, "v")
        if backend == "flash":
            out = _flash_attn_func(
                q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                causal=True, softmax_scale=scale,
            )
            return out.transpose(1, 2)
        lq, lk = q.shape[2], kk.shape[2]
        if lq == lk:
            return F.scaled_dot_product_attention(
                q, kk, vv, is_causal=True, scale=scale, enable_gqa=groups > 1
            )
        return F.scaled_dot_product_attention(
            q, kk, vv, attn_mask=causal_lower_right(lq, lk), scale=scale, enable_gqa=groups > 1
        )
