"""Attention kernels that return (output, logsumexp) and take them back in backward.

:class:`pipelining_seq.ChunkedCausalAttention`'s blockwise backend runs one kernel call
per (query chunk, cached key chunk) block and merges the blocks by log-sum-exp; the
backward replays the same blocks against the merged output. The fused ops are torch's
private ATen entry points (``_scaled_dot_product_flash_attention*``); a math path covers
dtypes and devices without one.
"""

from __future__ import annotations

import torch

__all__ = ["flash_backward", "flash_forward"]




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
