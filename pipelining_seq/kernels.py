"""Attention kernels that return (output, logsumexp) and take them back in backward.

:class:`pipelining_seq.ChunkedCausalAttention`'s blockwise backend runs one kernel call
per (query rows, key tile) block and merges the blocks by log-sum-exp; the backward
replays the same blocks against the merged output. The fused ops are torch's private
ATen entry points, chosen per block (:func:`_fused_kernel`):

* CPU, every dtype: ``_scaled_dot_product_flash_attention_for_cpu`` (a document mask as
  an additive ``-inf`` mask);
* CUDA fp16/bf16 without a mask: ``_scaled_dot_product_flash_attention``;
* CUDA with a mask (fp16, bf16, fp32), and CUDA fp32 without one:
  ``_scaled_dot_product_efficient_attention`` (torch's memory-efficient kernel), which
  takes an additive bias and returns the logsumexp, so masked tiles no longer
  materialise their scores;
* anything else (CUDA float64, other devices): an exact math path.

Things the fused kernels do not do are handled here, exactly:

* a value head size different from the query/key head size (MLA): the smaller side is
  zero-padded (zero columns of q and k add nothing to the scores, zero columns of v give
  zero output columns, which are cut off again); the efficient kernel also gets its
  head size padded up to 16 bytes, the alignment its CUDA kernels need;
* rows that a tile's mask empties entirely: the CPU kernel reports logsumexp 0 for them,
  the efficient kernel NaN; their logsumexp is set to ``-inf`` and their output to 0, so
  they weigh nothing in the merge (the efficient forward gets a bias of 0 on those rows,
  so that no NaN is computed at all; its backward gets the true ``-inf`` bias, and the
  merged logsumexp of every row is finite, since every query attends to itself, so the
  rows' probabilities ``exp(-inf - lse)`` are exactly 0);
* the efficient kernel's own layout rules (see :func:`_efficient_forward`).

flash-attn's varlen kernel is not used for masked tiles: its documents are ``cu_seqlens``
runs of one query and one key range, while a tile's mask is any boolean matrix (documents
cropped to the tile, a window, the batch rows' different layouts).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import _compat

__all__ = ["flash_backward", "flash_forward", "work_dtype"]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the logsumexp and of the merge: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _cpu_forward(q, k, v, causal, scale, mask):
    out, lse = _compat.flash_attention_ops("cpu")[0](
        q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
    )
    if mask is not None:
        lse = lse.masked_fill(~mask.any(-1), float("-inf"))
    return out, lse, None


def _cpu_backward(dout, q, k, v, out, lse, aux, causal, scale, mask):
    return _compat.flash_attention_ops("cpu")[1](
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
    )


def _cuda_forward(q, k, v, causal, scale, mask):
    res = _compat.flash_attention_ops("cuda")[0](
        q, k, v, 0.0, causal, False, scale=scale
    )
    # cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused: handed back to the backward
    # exactly as torch's own autograd formula does.
    return res[0], res[1], res[2:8]


def _cuda_backward(dout, q, k, v, out, lse, aux, causal, scale, mask):
    cum_q, cum_k, max_q, max_k, rng_state, unused = aux
    return _compat.flash_attention_ops("cuda")[1](
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused,
        scale=scale,
    )


def _math_scores(q, k, causal, scale, mask, work):
    scores = (q @ k.transpose(-2, -1)).to(work) * scale
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        scores = scores.masked_fill(~tri, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def _math_forward(q, k, v, causal, scale, mask=None):
    # Reference path for dtypes/devices without a fused kernel (e.g. CUDA float64).
    scores = _math_scores(q, k, causal, scale, mask, work_dtype(q.dtype))
    lse = torch.logsumexp(scores, dim=-1)
    # A fully masked row has lse -inf; exp(-inf - 0) keeps its probabilities at 0.
    p = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    return (p.to(v.dtype) @ v), lse, None


def _math_backward(dout, q, k, v, out, lse, aux, causal, scale, mask=None):
    scores = _math_scores(q, k, causal, scale, mask, lse.dtype)
    p = torch.exp(scores - lse.unsqueeze(-1))
    dv = p.to(dout.dtype).transpose(-2, -1) @ dout
    dp = (dout @ v.transpose(-2, -1)).to(lse.dtype)
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = ds.to(q.dtype) @ k
    dk = ds.to(q.dtype).transpose(-2, -1) @ q
    return dq, dk, dv


def _efficient_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *, forward: bool) -> torch.Tensor:
    """The efficient kernel's additive bias for a boolean ``mask``: ``[B, H, Lq, Lk]`` of
    q's dtype, its rows 16-element aligned in memory (as torch's own ``pad_bias`` does:
    allocate the last dim padded to a multiple of 16, slice back); the head dim (and a
    broadcast batch) stay stride-0 expands. ``forward``: rows the mask empties get bias 0
    instead of ``-inf`` (the caller sets their result)."""
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m = m.expand(m.shape[0], m.shape[1], lq, lk)
    if forward:
        m = m | ~m.any(-1, keepdim=True)
    bias = torch.zeros((*m.shape[:3], lk + (-lk) % 16), dtype=q.dtype, device=q.device)[..., :lk]
    return bias.masked_fill_(~m, float("-inf")).expand(b, h, lq, lk)


def _lse_for_merge(lse: torch.Tensor, lq: int) -> torch.Tensor:
    """The kernel's logsumexp cut to the tile's rows: it pads the query dim (to a multiple
    of 32 on CUDA, with +inf)."""
    return lse[..., :lq].contiguous()


def _lse_for_kernel(lse: torch.Tensor, length: int) -> torch.Tensor:
    """The merged logsumexp padded back to the length the forward kernel returned (the
    backward kernel reads the padded rows); padded with +inf as the kernel pads it."""
    return F.pad(lse, (0, length - lse.shape[-1]), value=float("inf"))


def _out_for_kernel(out: torch.Tensor) -> torch.Tensor:
    """``out`` laid out as the forward kernel returns it ([B, L, H, D] in memory): the
    backward kernel takes out's batch and head strides but derives its row stride as
    ``H * D`` (``o_strideM``)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _clear_empty_rows(out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor):
    """Output 0 and logsumexp ``-inf`` on the rows ``mask`` empties (whatever the kernel
    computed there), as ``_cpu_forward`` does: they weigh nothing in the merge."""
    empty = ~mask.any(-1)
    return out.masked_fill_(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def _efficient_forward(q, k, v, causal, scale, mask):
    # q, k, v arrive with equal head counts (blockwise expands grouped K/V heads).
    lq = q.shape[-2]
    bias = None if mask is None else _efficient_bias(mask, q, k, forward=True)
    out, lse, seed, offset = _compat.efficient_attention_ops()[0](q, k, v, bias, True, 0.0, causal, scale=scale)
    aux = (seed, offset, lse.shape[-1])
    lse = _lse_for_merge(lse, lq)
    if mask is not None:
        out, lse = _clear_empty_rows(out, lse, mask)
    return out, lse, aux


def _efficient_backward(dout, q, k, v, out, lse, aux, causal, scale, mask):
    seed, offset, lse_len = aux
    bias = None if mask is None else _efficient_bias(mask, q, k, forward=False)
    dq, dk, dv, _ = _compat.efficient_attention_ops()[1](
        dout, q, k, v, bias, _out_for_kernel(out), _lse_for_kernel(lse, lse_len), seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale,
    )
    return dq, dk, dv


_EFFICIENT_DTYPES: dict[str, tuple[torch.dtype, ...]] = {"cuda": (torch.float16, torch.bfloat16, torch.float32)}
"""Per device type, the dtypes whose masked tiles (and whose unmasked tiles that no flash
kernel serves) run on torch's memory-efficient kernel. A test seam too: the unit tests
point "cpu" at a reference implementation of the ops."""


def _fused_kernel(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    dev = q.device.type
    flash = dev == "cpu" or (dev == "cuda" and q.dtype in (torch.float16, torch.bfloat16))
    if q.dtype in _EFFICIENT_DTYPES.get(dev, ()) and (mask is not None or not flash):
        return "efficient"
    if dev == "cpu":
        return "cpu"
    if flash and mask is None:
        return "cuda"
    return "math"


_FORWARD = {"cpu": _cpu_forward, "cuda": _cuda_forward, "efficient": _efficient_forward, "math": _math_forward}
_BACKWARD = {"cpu": _cpu_backward, "cuda": _cuda_backward, "efficient": _efficient_backward, "math": _math_backward}

_RECORDERS: list[Counter] = []


@contextlib.contextmanager
def _record_kernels() -> Iterator[Counter]:
    """Count ``flash_forward`` calls inside the block by ``(kernel, masked)`` (benchmarks)."""
    counts: Counter = Counter()
    _RECORDERS.append(counts)
    try:
        yield counts
    finally:
        _RECORDERS.remove(counts)


def _kernel_head_dim(kind: str, q: torch.Tensor, dqk: int, dv: int) -> int | None:
    """The head size ``kind`` runs at, None when q/k/v go as they are."""
    if kind == "math":
        return None
    d = max(dqk, dv)
    if kind == "efficient":
        align = max(1, 16 // q.element_size())  # torch's minimum_gemm_alignment on sm80+
        d = -(-d // align) * align
    return None if d == dqk == dv else d


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def flash_forward(q, k, v, *, causal: bool, scale: float, mask: torch.Tensor | None = None):
    """(out, lse, aux) of softmax attention on [B, H, L, D] tensors.

    ``causal`` is only used on square blocks, where top-left and bottom-right alignment
    agree. ``mask`` (bool, broadcastable to [B, H, Lq, Lk], True = attend) restricts
    the block further. ``aux`` is kernel state that ``flash_backward`` must get back.
    ``v`` may have a different head size than ``q``/``k``.
    """
    kind = _fused_kernel(q, mask)
    for counts in _RECORDERS:
        counts[kind, mask is not None] += 1
    dqk, dv = q.shape[-1], v.shape[-1]
    d = _kernel_head_dim(kind, q, dqk, dv)
    if d is None:
        return _FORWARD[kind](q, k, v, causal, scale, mask)
    out, lse, aux = _FORWARD[kind](_pad_last(q, d), _pad_last(k, d), _pad_last(v, d), causal, scale, mask)
    return out[..., :dv], lse, aux


def flash_backward(dout, q, k, v, out, lse, aux, *, causal: bool, scale: float,
                   mask: torch.Tensor | None = None):
    """(dq, dk, dv) of one block, given the *merged* output and logsumexp of all blocks."""
    kind = _fused_kernel(q, mask)
    dqk, dv = q.shape[-1], v.shape[-1]
    d = _kernel_head_dim(kind, q, dqk, dv)
    if d is None:
        return _BACKWARD[kind](dout, q, k, v, out, lse, aux, causal, scale, mask)
    dq, dk, dvv = _BACKWARD[kind](
        _pad_last(dout, d), _pad_last(q, d), _pad_last(k, d), _pad_last(v, d), _pad_last(out, d),
        lse, aux, causal, scale, mask,
    )
    return dq[..., :dqk], dk[..., :dqk], dvv[..., :dv]
