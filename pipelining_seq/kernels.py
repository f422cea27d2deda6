"""Attention kernels that return (output, logsumexp) and take them back in backward.

:class:`pipelining_seq.ChunkedCausalAttention`'s blockwise backend runs one kernel call
per (query rows, key tile) block and merges the blocks by log-sum-exp; the backward
replays the same blocks against the merged output. The fused ops are torch's private
ATen entry points (``_scaled_dot_product_flash_attention*``); a math path covers dtypes
and devices without one, and blocks with a document mask on CUDA.

Two things the fused kernels do not do are handled here, exactly:

* a value head size different from the query/key head size (MLA): the smaller side is
  zero-padded (zero columns of q and k add nothing to the scores, zero columns of v give
  zero output columns, which are cut off again);
* a boolean mask (documents): on CPU it is passed to the fused kernel as an additive
  ``-inf`` mask, and the logsumexp of rows that the mask empties entirely is set to
  ``-inf`` (the kernel reports 0 for them), so such rows weigh nothing in the merge.
"""

from __future__ import annotations

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
    # Reference path for dtypes/devices without a fused kernel (e.g. CUDA float32).
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


def _fused_kernel(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and mask is None:
        return "cuda"
    return "math"


_FORWARD = {"cpu": _cpu_forward, "cuda": _cuda_forward, "math": _math_forward}
_BACKWARD = {"cpu": _cpu_backward, "cuda": _cuda_backward, "math": _math_backward}


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
    dqk, dv = q.shape[-1], v.shape[-1]
    if kind == "math" or dqk == dv:
        return _FORWARD[kind](q, k, v, causal, scale, mask)
    d = max(dqk, dv)
    out, lse, aux = _FORWARD[kind](_pad_last(q, d), _pad_last(k, d), _pad_last(v, d), causal, scale, mask)
    return out[..., :dv], lse, aux


def flash_backward(dout, q, k, v, out, lse, aux, *, causal: bool, scale: float,
                   mask: torch.Tensor | None = None):
    """(dq, dk, dv) of one block, given the *merged* output and logsumexp of all blocks."""
    kind = _fused_kernel(q, mask)
    dqk, dv = q.shape[-1], v.shape[-1]
    if kind == "math" or dqk == dv:
        return _BACKWARD[kind](dout, q, k, v, out, lse, aux, causal, scale, mask)
    d = max(dqk, dv)
    dq, dk, dvv = _BACKWARD[kind](
        _pad_last(dout, d), _pad_last(q, d), _pad_last(k, d), _pad_last(v, d), _pad_last(out, d),
        lse, aux, causal, scale, mask,
    )
    return dq[..., :dqk], dk[..., :dqk], dvv[..., :dv]
