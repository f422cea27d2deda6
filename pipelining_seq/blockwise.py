"""The blockwise engine of ChunkedCausalAttention: tiles, merge, backward, compiled op.

Chunk j's queries attend to the cached K/V of chunks 0..j-1 and to their own chunk. The
engine cuts that into tiles, runs one kernel per tile (``pipelining_seq.kernels``) and
merges the tiles by log-sum-exp; the backward replays the same tiles against the merged
output and logsumexp, keeps the gradients for earlier chunks' K/V in the cache, and
returns the own chunk's.

Without document ids or a window a tile is a whole chunk (causal on the own chunk). With
document ids ``[batch, len]`` a query sees earlier-or-equal keys of its own document
only; with a window ``w`` the query at absolute position ``i`` sees the key at ``j`` only
if ``0 <= i - j < w``. Keys are then cut into tiles of ``TILE`` tokens; a tile no query
can reach is skipped (a cached chunk none of whose documents continue into this chunk,
or that lies wholly behind the window, is not read at all; its K/V stay in the cache),
the rows of a tile are cropped to the queries that reach it, and a mask is passed only
when the cropped tile is not fully visible (a tile that straddles a boundary).

:func:`compiled_chunk_attention` is the same engine as a ``torch.library`` custom op, for
blocks under ``torch.compile``: the op is opaque to the compiler, finds the cache from
the running unit at run time, and keeps its own copies of K/V (a compiled graph may
reuse the memory of its intermediate tensors).
"""

from dataclasses import dataclass
from typing import Any

import torch

from . import kernels
from .context import ContractError, _LayerKV, cache_by_token, current_chunk
from .guard import allow_attention

__all__ = ["TILE", "Tile", "backward_tiles", "compiled_chunk_attention", "forward_tiles", "plan_tiles"]

TILE = 256
"""Key tile size (tokens) when document ids are given."""


@dataclass
class Tile:
    src: int
    """Chunk whose keys the tile reads."""
    k0: int
    k1: int
    """Key range within chunk ``src``."""
    r0: int
    r1: int
    """Query rows of the current chunk."""
    causal: bool
    """A whole own chunk without documents: the fused causal kernel, no mask."""
    mask: torch.Tensor | None
    """bool [batch, 1, rows, keys] (True = attend), None when all visible."""
    aux: Any = None


def expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reduce_heads(g: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return g
    b, h, s, d = g.shape
    return g.view(b, h // groups, groups, s, d).sum(2)


def plan_tiles(kv: _LayerKV, j: int, lq: int, window: int | None = None) -> list[Tile]:
    """Tiles of chunk j, from the document ids in ``kv`` and the window (none of
    either: whole chunks)."""
    ids_q = kv.ids[j]
    if ids_q is None and window is None:
        return [Tile(i, 0, kv.k[i].shape[2], 0, lq, i == j, None) for i in range(j + 1)]
    # Absolute position of each chunk's first token (chunks 0..j are all still cached
    # while chunk j runs its forward, or recomputes it).
    starts = [0]
    for i in range(j):
        starts.append(starts[-1] + kv.k[i].shape[2])
    device = kv.k[j].device
    qpos = torch.arange(starts[j], starts[j] + lq, device=device)
    tiles = []
    for i in range(j + 1):
        ids_k = kv.ids[i]
        lk = kv.k[i].shape[2]
        # Cheap tests first: a cached chunk wholly behind the window, or sharing no
        # document with this one, is skipped.
        if i < j and window is not None and starts[j] - (starts[i] + lk - 1) >= window:
            continue
        if i < j and ids_q is not None and not torch.isin(ids_k, ids_q).any():
            continue
        if ids_q is None and starts[j] + lq - 1 - starts[i] < window:
            # Every key of the chunk is inside every query's window: as without a window.
            tiles.append(Tile(i, 0, lk, 0, lq, i == j, None))
            continue
        for k0 in range(0, lk, TILE):
            k1 = min(lk, k0 + TILE)
            if window is not None and starts[j] - (starts[i] + k1 - 1) >= window:
                continue  # the tile's last key is out of every query's window
            dist = qpos[:, None] - torch.arange(starts[i] + k0, starts[i] + k1, device=device)[None, :]
            see = (dist >= 0) if i == j else torch.ones_like(dist, dtype=torch.bool)
            if window is not None:
                see = see & (dist < window)
            see = see[None] if ids_q is None else see & (ids_q[:, :, None] == ids_k[:, None, k0:k1])
            reach = see.any(dim=(0, 2)).nonzero()
            if reach.numel() == 0:
                continue
            r0, r1 = int(reach[0]), int(reach[-1]) + 1
            sub = see[:, r0:r1]
            tiles.append(Tile(i, k0, k1, r0, r1, False, None if bool(sub.all()) else sub.unsqueeze(1)))
    return tiles


def forward_tiles(q: torch.Tensor, kv: _LayerKV, j: int, scale: float, groups: int, window: int | None = None):
    """(out, lse) of chunk j over its tiles; stores the plan (and kernel state) in ``kv``."""
    b, h, lq, _ = q.shape
    plan = plan_tiles(kv, j, lq, window)
    kv.plan[j] = plan
    whole = [t for t in plan if t.r0 == 0 and t.r1 == lq]
    if len(plan) == 1 and whole:
        t = plan[0]
        out, lse, t.aux = kernels.flash_forward(
            q, expand_heads(kv.k[t.src][:, :, t.k0:t.k1], groups), expand_heads(kv.v[t.src][:, :, t.k0:t.k1], groups),
            causal=t.causal, scale=scale, mask=t.mask,
        )
        return out, lse
    if len(whole) == len(plan):
        # Every tile spans all rows (always without documents): one stacked merge, which
        # keeps the kernels' [b, s, h, d] output layout (the out-projection input is a view).
        outs, lses = [], []
        for t in plan:
            o, lt, t.aux = kernels.flash_forward(
                q, expand_heads(kv.k[t.src][:, :, t.k0:t.k1], groups),
                expand_heads(kv.v[t.src][:, :, t.k0:t.k1], groups),
                causal=t.causal, scale=scale, mask=t.mask,
            )
            outs.append(o)
            lses.append(lt)
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        out = sum(torch.exp(lt - lse).unsqueeze(-1) * o.to(lse.dtype) for o, lt in zip(outs, lses))
        return out.to(q.dtype), lse
    work = kernels.work_dtype(q.dtype)
    dv = kv.v[j].shape[-1]
    lse = torch.full((b, h, lq), float("-inf"), dtype=work, device=q.device)
    # [b, lq, h, dv] in memory, as the fused kernels return it: the caller's
    # transpose(1, 2).reshape for the output projection is then a view, not a copy.
    acc = torch.zeros((b, lq, h, dv), dtype=work, device=q.device).transpose(1, 2)
    for t in plan:
        r = slice(t.r0, t.r1)
        qt = q if (t.r0, t.r1) == (0, lq) else q[:, :, r].contiguous()
        o, lt, t.aux = kernels.flash_forward(
            qt, expand_heads(kv.k[t.src][:, :, t.k0:t.k1], groups),
            expand_heads(kv.v[t.src][:, :, t.k0:t.k1], groups),
            causal=t.causal, scale=scale, mask=t.mask,
        )
        old = lse[:, :, r]
        new = torch.logaddexp(old, lt)
        # Rows still empty on both sides give exp(nan); they weigh nothing.
        w_old = torch.nan_to_num(torch.exp(old - new), nan=0.0).unsqueeze(-1)
        w_new = torch.nan_to_num(torch.exp(lt - new), nan=0.0).unsqueeze(-1)
        acc[:, :, r] = acc[:, :, r] * w_old + o.to(work) * w_new
        lse[:, :, r] = new
    return acc.to(q.dtype), lse


def _accumulate(acc: torch.Tensor | None, sl: slice, grad: torch.Tensor, like: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``acc[:, :, sl] += grad`` with ``acc`` shaped like ``like`` in ``dtype``; a missing
    ``acc`` becomes ``grad`` itself when ``grad`` covers all of dim 2, else zeros first."""
    whole = sl.start == 0 and sl.stop == like.shape[2]
    if acc is None:
        if whole:
            return grad.to(dtype)
        acc = _zeros(like, dtype)
    # add_ on the view: ``acc[:, :, sl] += grad`` would also copy the view onto itself.
    (acc if whole else acc[:, :, sl]).add_(grad)
    return acc


def _zeros(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=dtype, device=like.device)


def backward_tiles(dout, q, out, lse, kv: _LayerKV, j: int, scale: float, groups: int):
    """(dq, dk, dv) of chunk j's own q/k/v; gradients for earlier chunks stay in ``kv``."""
    if kv.pending_after("kv", j):
        raise ContractError(
            f"backward of chunk {j} ran while a later chunk's backward is still pending: "
            "Seq1F1B needs backwards in reverse chunk order within a micro-batch"
        )
    lq = q.shape[2]
    plan = kv.plan[j]
    work = kernels.work_dtype(q.dtype)
    k_own, v_own = kv.k[j], kv.v[j]
    # Accumulators start as the first tile's gradient when it covers the whole range
    # (always without documents): no zero fill and one add fewer per tile and layer.
    dq = dk_own = dv_own = None
    for t in plan:
        r = slice(t.r0, t.r1)
        full = (t.r0, t.r1) == (0, lq)

        def rows(x: torch.Tensor, r: slice = r, full: bool = full) -> torch.Tensor:
            return x if full else x[:, :, r].contiguous()

        kt, vt = kv.k[t.src][:, :, t.k0:t.k1], kv.v[t.src][:, :, t.k0:t.k1]
        dq_t, dk_t, dv_t = kernels.flash_backward(
            rows(dout), rows(q), expand_heads(kt, groups), expand_heads(vt, groups), rows(out), rows(lse),
            t.aux, causal=t.causal, scale=scale, mask=t.mask,
        )
        dq = _accumulate(dq, r, dq_t, q, work)
        dk_t, dv_t = reduce_heads(dk_t, groups), reduce_heads(dv_t, groups)
        keys = slice(t.k0, t.k1)
        if t.src == j:
            dk_own = _accumulate(dk_own, keys, dk_t, k_own, work)
            dv_own = _accumulate(dv_own, keys, dv_t, v_own, work)
        else:
            # The relay keeps the K/V dtype (what the chunk's own backward adds it to).
            src = t.src
            kv.dk[src] = _accumulate(kv.dk[src], keys, dk_t, kv.k[src], kv.k[src].dtype)
            kv.dv[src] = _accumulate(kv.dv[src], keys, dv_t, kv.v[src], kv.v[src].dtype)
    # Every query and own key meets at least itself in a tile; zeros only if a plan had none.
    dq = _zeros(q, work) if dq is None else dq
    dk_own = _zeros(k_own, work) if dk_own is None else dk_own
    dv_own = _zeros(v_own, work) if dv_own is None else dv_own
    if kv.dk[j] is not None:
        dk_own += kv.dk[j]
        dv_own += kv.dv[j]
    kv.mark_done("kv", j)
    kv.release(j)
    return dq.to(q.dtype), dk_own.to(k_own.dtype), dv_own.to(v_own.dtype)


class BlockwiseChunkAttention(torch.autograd.Function):
    """Eager path: chunk j's attention over cached K/V and its own chunk."""

    @staticmethod
    def forward(ctx, q, k, v, ids, kv: _LayerKV, j: int, scale: float, groups: int, window: int | None = None):
        kv.store(j, k.detach(), v.detach(), ids)
        out, lse = forward_tiles(q, kv, j, scale, groups, window)
        ctx.save_for_backward(q, out, lse)
        ctx.kv, ctx.j, ctx.scale, ctx.groups = kv, j, scale, groups
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse = ctx.saved_tensors
        with allow_attention():
            dq, dk, dv = backward_tiles(dout.contiguous(), q, out, lse, ctx.kv, ctx.j, ctx.scale, ctx.groups)
        return dq, dk, dv, None, None, None, None, None, None


# ------------------------------------------------------------------ compiled path
def unit_layer(q: torch.Tensor, layer_key: int) -> tuple[Any, _LayerKV, int]:
    """The running unit, this layer's cache entry and the chunk index (with checks)."""
    ctx = current_chunk()
    if ctx is None:
        raise ContractError("ChunkedCausalAttention's chunk op ran outside a Seq1F1B unit")
    if q.shape[2] != ctx.length:
        raise ContractError(
            f"ChunkedCausalAttention got {q.shape[2]} query tokens inside chunk "
            f"{ctx.chunk} of micro-batch {ctx.microbatch}, which has {ctx.length}: "
            "attention must see the whole chunk the stage received, along dim 2"
        )
    kv = ctx.cache.layer(ctx.microbatch, layer_key)
    j = ctx.chunk
    if len(kv.k) != j and not ctx.recompute:
        raise ContractError(
            f"ChunkedCausalAttention instance called with cache of {len(kv.k)} chunks in "
            f"chunk {j} of micro-batch {ctx.microbatch}: use one instance per attention "
            "layer and call it once per forward"
        )
    return ctx, kv, j


@torch.library.custom_op("pipelining_seq::chunk_attention", mutates_args=())
def compiled_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None,
    layer_key: torch.Tensor, scale: float, groups: int, window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, meta) of the running unit's chunk; meta = (cache token, micro-batch, chunk, layer).
    ``window`` 0 means no window."""
    key = int(layer_key)
    with allow_attention():
        ctx, kv, j = unit_layer(q, key)
        ids = None if document_ids is None else document_ids.clone()
        kv.store(j, k.detach().clone(), v.detach().clone(), ids)
        out, lse = forward_tiles(q, kv, j, scale, groups, window or None)
    meta = torch.tensor([ctx.cache.token, ctx.microbatch, j, key], dtype=torch.int64)
    return out.contiguous(), lse.contiguous(), meta


@compiled_chunk_attention.register_fake
def _(q, k, v, document_ids, layer_key, scale, groups, window=0):
    b, h, lq, _ = q.shape
    return (
        q.new_empty((b, h, lq, v.shape[-1])),
        q.new_empty((b, h, lq), dtype=kernels.work_dtype(q.dtype)),
        q.new_empty((4,), dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("pipelining_seq::chunk_attention_backward", mutates_args=())
def _compiled_backward(
    dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, meta: torch.Tensor,
    scale: float, groups: int, kv_heads: int, v_head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    token, mb, j, key = (int(x) for x in meta.tolist())
    kv = cache_by_token(token).layer(mb, key)
    with allow_attention():
        dq, dk, dv = backward_tiles(dout.contiguous(), q, out, lse, kv, j, scale, groups)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_compiled_backward.register_fake
def _(dout, q, out, lse, meta, scale, groups, kv_heads, v_head_dim):
    b, _, lq, d = q.shape
    return q.new_empty(q.shape), q.new_empty((b, kv_heads, lq, d)), q.new_empty((b, kv_heads, lq, v_head_dim))


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    scale, groups = inputs[5], inputs[6]
    out, lse, meta = output
    ctx.save_for_backward(q, out, lse, meta)
    ctx.args = (scale, groups, k.shape[1], v.shape[-1])


def _backward(ctx, dout, _dlse, _dmeta):
    q, out, lse, meta = ctx.saved_tensors
    dq, dk, dv = _compiled_backward(dout, q, out, lse, meta, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


compiled_chunk_attention.register_autograd(_backward, setup_context=_setup_context)
