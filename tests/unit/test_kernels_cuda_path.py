"""The CUDA memory-efficient path of pipelining_seq.kernels, checked on CPU.

torch's ``_scaled_dot_product_efficient_attention`` ops run on CUDA only. Their pre- and
post-processing in kernels.py (bias alignment and dtype, padded logsumexp, rows a tile's
mask empties, the output layout the backward kernel assumes, head-size alignment) is
checked here by pointing ``_compat.efficient_attention_ops`` at a float64 reference of
the two ops that behaves like the CUDA kernels where it matters: additive bias added
after scaling, logsumexp padded with +inf to a multiple of 32 rows, NaN for a row whose
bias is all ``-inf``, and the same refusals (bias shape/dtype/alignment, unaligned head
size, unequal head counts, an ``out`` not laid out as [B, L, H, D], a logsumexp of the
wrong length). Every sabotaged pre-/post-processing step below makes the check fail.
"""

from types import SimpleNamespace

import pytest
import torch

from pipelining_seq import ChunkedCausalAttention, _compat, blockwise, kernels
from tests.unit.test_documents import block_causal_reference, chunked_run, ids_from_lengths, make

REAL_BIAS = kernels._efficient_bias
LSE_ALIGN = 32  # CUDA pads the kernel's logsumexp rows to a multiple of 32 (_meta_registrations)


def _check_common(query, key, value, bias):
    if query.dim() != 4 or key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
        raise RuntimeError("efficient attention: q, k, v need the same number of heads")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError("efficient attention: q and k head sizes differ")
    align = 16 // query.element_size()
    if query.shape[-1] % align or value.shape[-1] % align:
        raise RuntimeError("cutlassF: no kernel found to launch! (unaligned head size)")
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        raise RuntimeError("efficient attention: last dim must be contiguous")
    if bias is None:
        return
    b, h, lq, lk = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    if bias.dim() != 4 or tuple(bias.shape) != (b, h, lq, lk):
        raise RuntimeError(f"attn_bias: wrong shape {tuple(bias.shape)}, expected {(b, h, lq, lk)}")
    if bias.dtype != query.dtype:
        raise RuntimeError("invalid dtype for bias - should match query's dtype")
    if bias.stride(-1) != 1 or any(bias.stride(i) % 16 for i in range(3)):
        raise RuntimeError(f"attn_bias is not correctly aligned (strides {bias.stride()})")


def _scores(query, key, bias, is_causal, scale):
    s = (query @ key.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    if is_causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf"))
    return s


def ref_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    assert compute_log_sumexp and dropout_p == 0.0
    _check_common(query, key, value, attn_bias)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(query, key, attn_bias, is_causal, scale)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)  # NaN on a row whose scores are all -inf, as the CUDA kernel gives
    l_ = p.sum(-1, keepdim=True)
    out = (p @ value) / l_
    lse = (m + torch.log(l_)).squeeze(-1)
    b, h, lq, dv = out.shape
    laid = torch.empty(b, lq, h, dv, dtype=out.dtype).transpose(1, 2).copy_(out)  # [B, L, H, D] in memory
    padded = torch.full((b, h, -(-lq // LSE_ALIGN) * LSE_ALIGN), float("inf"), dtype=lse.dtype)
    padded[..., :lq] = lse
    return laid, padded, torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)


def ref_backward(grad_out, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset, dropout_p,
                 grad_input_mask, is_causal=False, *, scale=None):
    assert dropout_p == 0.0 and list(grad_input_mask) == [True, True, True, False]
    _check_common(query, key, value, attn_bias)
    b, h, lq, dv = out.shape
    # The kernel takes out's batch and head strides, but steps rows by H * D (o_strideM).
    if out.stride(-1) != 1 or (lq > 1 and out.stride(2) != h * dv):
        raise RuntimeError(f"out must be [B, L, H, D] in memory (o_strideM = H*D), got strides {out.stride()}")
    if tuple(logsumexp.shape) != (b, h, -(-lq // LSE_ALIGN) * LSE_ALIGN):
        raise RuntimeError(f"logsumexp of shape {tuple(logsumexp.shape)} for {lq} queries")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(query, key, attn_bias, is_causal, scale)
    p = torch.exp(s - logsumexp[..., :lq, None])
    dv_ = p.transpose(-2, -1) @ grad_out
    dp = grad_out @ value.transpose(-2, -1)
    ds = p * (dp - (grad_out * out).sum(-1, keepdim=True))
    return ds @ key * scale, ds.transpose(-2, -1) @ query * scale, dv_, None


@pytest.fixture
def efficient_on_cpu(monkeypatch):
    """float64 CPU tiles with a mask take the efficient path, served by the reference ops."""
    monkeypatch.setitem(kernels._EFFICIENT_DTYPES, "cpu", (torch.float64,))
    monkeypatch.setattr(_compat, "efficient_attention_ops", lambda: (ref_forward, ref_backward))
    emptied = []
    original = kernels._FORWARD["efficient"]

    def forward(q, k, v, causal, scale, mask):
        if mask is not None:
            emptied.append(bool((~mask.any(-1)).any()))
        return original(q, k, v, causal, scale, mask)

    monkeypatch.setitem(kernels._FORWARD, "efficient", forward)
    return emptied


# Row 0 / row 1 document lengths (each sums to 24): boundaries inside chunks, and the two
# batch rows differ, so a tile's rows cropped to the union leave rows of one batch row empty.
LAYOUTS = {"crossing": ([5, 9, 10], [12, 12]), "mixed": ([3, 1, 13, 7], [24]), "short": ([1, 1, 20, 1, 1], [7, 17])}
PARTITIONS = [[24], [6, 6, 6, 6], [11, 7, 4, 2], [1, 22, 1]]


def check_documents(layout, lengths, tile, d, dv, monkeypatch):
    monkeypatch.setattr(blockwise, "TILE", tile)
    ids = ids_from_lengths(*LAYOUTS[layout])
    q, k, v, g = make(d=d, dv=dv)  # 4 query heads over 2 K/V heads
    ref_out, ref_grads = block_causal_reference(q, k, v, g, ids)
    with kernels._record_kernels() as counts:
        out, grads, _ = chunked_run(ChunkedCausalAttention(backend="blockwise"), q, k, v, g, lengths, ids)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    return counts


@pytest.mark.parametrize("d,dv", [(8, 8), (7, 5)])  # (7, 5): MLA padding, then up to the 16-byte alignment
@pytest.mark.parametrize("tile", [3, 5, 256])
@pytest.mark.parametrize("lengths", PARTITIONS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_documents_through_efficient_path_equal_block_causal(layout, lengths, tile, d, dv, efficient_on_cpu,
                                                              monkeypatch):
    counts = check_documents(layout, lengths, tile, d, dv, monkeypatch)
    assert counts["efficient", True] > 0 and counts["cpu", True] == 0 and counts["math", True] == 0, counts


def test_some_tiles_leave_rows_without_any_key(efficient_on_cpu, monkeypatch):
    # The cases above include tiles whose mask empties some rows (the "-inf lse, 0 out" rule).
    check_documents("crossing", [11, 7, 4, 2], 3, 8, 8, monkeypatch)
    assert any(efficient_on_cpu) and not all(efficient_on_cpu)


@pytest.mark.parametrize("mask_shape", ["batch", "2d"])
def test_fully_masked_rows_give_minus_inf_lse_and_zero_out(mask_shape, efficient_on_cpu):
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(2, 3, 9, 6, dtype=torch.float64, generator=gen) for _ in range(4))
    mask = torch.rand(2, 1, 9, 13, generator=gen) > 0.4
    mask[:, :, 2] = False
    mask[1, :, 6] = False
    if mask_shape == "2d":
        mask = mask[0, 0]
    k, v = (torch.randn(2, 3, 13, 6, dtype=torch.float64, generator=gen) for _ in range(2))
    assert kernels._fused_kernel(q, mask) == "efficient"
    out, lse, aux = kernels.flash_forward(q, k, v, causal=False, scale=0.4, mask=mask)
    mout, mlse, _ = kernels._math_forward(q, k, v, False, 0.4, mask)
    empty = (~mask.any(-1)).expand(lse.shape)
    assert empty.any() and (lse[empty] == float("-inf")).all() and (out[empty] == 0).all()
    assert torch.isfinite(lse[~empty]).all() and lse.shape == (2, 3, 9)
    torch.testing.assert_close(out, mout, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, mlse, rtol=0, atol=1e-12)
    # The backward gets a merged lse (finite on every row: here one key every row sees).
    merged = torch.logaddexp(lse, torch.randn(lse.shape, dtype=torch.float64, generator=gen))
    grads = kernels.flash_backward(dout, q, k, v, out, merged, aux, causal=False, scale=0.4, mask=mask)
    mgrads = kernels._math_backward(dout, q, k, v, out, merged, None, False, 0.4, mask)
    for a, b in zip(grads, mgrads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_unmasked_tiles_through_efficient_path(causal, efficient_on_cpu):
    # CUDA float32 tiles without a mask take this path (no bias, causal square blocks).
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 2, 40, 8, dtype=torch.float64, generator=gen) for _ in range(4))
    out, lse, aux = kernels._efficient_forward(q, k, v, causal, 0.3, None)
    mout, mlse, _ = kernels._math_forward(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, mout, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, mlse, rtol=0, atol=1e-12)
    assert aux[2] == 64  # 40 rows: the kernel's logsumexp had 64
    grads = kernels._efficient_backward(dout, q, k, v, out.contiguous(), lse, aux, causal, 0.3, None)
    for a, b in zip(grads, kernels._math_backward(dout, q, k, v, out, lse, None, causal, 0.3)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _fake(device: str, dtype: torch.dtype):
    return SimpleNamespace(device=SimpleNamespace(type=device), dtype=dtype)


def test_dispatch_table():
    mask = torch.ones(1, dtype=torch.bool)
    cases = {
        ("cuda", torch.bfloat16, False): "cuda", ("cuda", torch.float16, False): "cuda",
        ("cuda", torch.bfloat16, True): "efficient", ("cuda", torch.float16, True): "efficient",
        ("cuda", torch.float32, True): "efficient", ("cuda", torch.float32, False): "efficient",
        ("cuda", torch.float64, True): "math", ("cuda", torch.float64, False): "math",
        ("cpu", torch.float32, True): "cpu", ("cpu", torch.bfloat16, False): "cpu",
        ("cpu", torch.float64, True): "cpu", ("xpu", torch.float32, False): "math",
    }
    for (dev, dtype, masked), kind in cases.items():
        assert kernels._fused_kernel(_fake(dev, dtype), mask if masked else None) == kind, (dev, dtype, masked)


def _no_pad_bias(mask, q, k, *, forward):
    m = mask.expand(q.shape[0], 1, q.shape[2], k.shape[2])
    if forward:
        m = m | ~m.any(-1, keepdim=True)
    return torch.zeros(m.shape, dtype=q.dtype).masked_fill_(~m, float("-inf")).expand(*q.shape[:3], k.shape[2])


SABOTAGE = {
    "lse not sliced to the rows": ("_lse_for_merge", lambda lse, lq: lse),
    "lse not padded back": ("_lse_for_kernel", lambda lse, length: lse),
    "out not in the kernel's layout": ("_out_for_kernel", lambda out: out.contiguous()),
    "bias rows not 16-aligned": ("_efficient_bias", _no_pad_bias),
    "bias in float32": ("_efficient_bias", lambda mask, q, k, *, forward: REAL_BIAS(
        mask, q.float(), k, forward=forward)),
    "empty rows not cleared": ("_clear_empty_rows", lambda out, lse, mask: (out, lse)),
    "forward bias in the backward": ("_efficient_bias", lambda mask, q, k, *, forward: (
        REAL_BIAS(mask, q, k, forward=True))),
    "no head-size alignment": ("_kernel_head_dim", lambda kind, q, dqk, dv: None if dqk == dv else max(dqk, dv)),
}


@pytest.mark.parametrize("name", sorted(SABOTAGE))
def test_sabotaged_processing_fails(name, efficient_on_cpu, monkeypatch):
    attr, broken = SABOTAGE[name]
    monkeypatch.setattr(kernels, attr, broken)
    with pytest.raises((AssertionError, RuntimeError)):
        check_documents("crossing", [11, 7, 4, 2], 3, 7, 5, monkeypatch)
