"""Sliding-window ChunkedCausalAttention against a whole-sequence masked softmax, in one process.

Query i sees key j iff 0 <= i - j < window (Hugging Face's convention), composed with
documents; chunked runs must equal the whole sequence on every backend (float64).
"""

import pytest
import torch
import torch.nn.functional as F

from pipelining_seq import ChunkContext, ChunkedCausalAttention, KVCache, attention, blockwise
from pipelining_seq.context import chunk_context
from tests.unit.test_attention import make_qkv

TOL = 1e-12


def doc_ids(batch: int, seq: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = (torch.rand(batch, seq, generator=g) < 0.2).long()
    starts[:, 0] = 0
    return starts.cumsum(1)


def reference(q, k, v, g, window, ids=None):
    """softmax(q k^T * scale + mask) v, written out, and its gradients."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    s = q.shape[2]
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    mask = (i - j >= 0) & (i - j < window if window is not None else True)
    mask = mask[None, None]
    if ids is not None:
        mask = mask & (ids[:, None, :, None] == ids[:, None, None, :])
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ kk.transpose(-2, -1)) / q.shape[-1] ** 0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    out.backward(g)
    return out.detach(), [q.grad, k.grad, v.grad]


def chunked(attn, q, k, v, g, lengths, ids=None):
    cache = KVCache()
    offs = [sum(lengths[:j]) for j in range(len(lengths))]
    outs, leaves = [], []
    for j, n in enumerate(lengths):
        sl = slice(offs[j], offs[j] + n)
        qj, kj, vj = (t[:, :, sl].detach().requires_grad_() for t in (q, k, v))
        kw = {} if ids is None else {"document_ids": ids[:, sl]}
        with chunk_context(ChunkContext(0, j, len(lengths), offs[j], n, cache)):
            outs.append(attn(qj, kj, vj, **kw))
        leaves.append((qj, kj, vj))
    for j in reversed(range(len(lengths))):
        outs[j].backward(g[:, :, offs[j]:offs[j] + lengths[j]])
    out = torch.cat([o.detach() for o in outs], 2)
    return out, [torch.cat([lv[i].grad for lv in leaves], 2) for i in range(3)], cache


def assert_same(out, grads, ref_out, ref_grads):
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=0)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["blockwise", "sdpa"])
@pytest.mark.parametrize("lengths", [[24], [12, 12], [6, 6, 6, 6], [11, 7, 4, 2], [1, 22, 1]])
@pytest.mark.parametrize("window", [1, 3, 7, 12, 40])
@pytest.mark.parametrize("docs", [False, True])
def test_window_chunked_equals_whole_float64(backend, lengths, window, docs):
    q, k, v, g = make_qkv(4, 2, seq=sum(lengths))
    ids = doc_ids(q.shape[0], q.shape[2]) if docs else None
    ref_out, ref_grads = reference(q, k, v, g, window, ids)
    attn = ChunkedCausalAttention(backend=backend, window=window)
    out, grads, cache = chunked(attn, q, k, v, g, lengths, ids)
    assert_same(out, grads, ref_out, ref_grads)
    entry = next(iter(cache._mbs[0].values()))
    assert all(t is None for t in (*entry.k, *entry.v, *entry.dk, *entry.dv))
    # Outside a pipeline: the same windowed attention on the whole sequence.
    kw = {} if ids is None else {"document_ids": ids}
    torch.testing.assert_close(attn(q, k, v, **kw), ref_out, atol=TOL, rtol=0)


@pytest.mark.parametrize("window", [2, 5, 9, 17])
@pytest.mark.parametrize("docs", [False, True])
def test_window_small_tiles_skip_exactly(monkeypatch, window, docs):
    # Key tiles of 4 tokens: tiles and whole cached chunks behind the window are skipped.
    monkeypatch.setattr(blockwise, "TILE", 4)
    lengths = [9, 7, 5, 3]
    q, k, v, g = make_qkv(4, 1, seq=sum(lengths), seed=1)
    ids = doc_ids(q.shape[0], q.shape[2], seed=5) if docs else None
    ref_out, ref_grads = reference(q, k, v, g, window, ids)
    attn = ChunkedCausalAttention(window=window)
    out, grads, cache = chunked(attn, q, k, v, g, lengths, ids)
    assert_same(out, grads, ref_out, ref_grads)


def test_window_skips_cached_chunks_behind_it():
    lengths = [8, 8, 8]
    q, k, v, _ = make_qkv(2, 2, seq=24)
    cache = KVCache()
    attn = ChunkedCausalAttention(window=4)
    for j, n in enumerate(lengths):
        sl = slice(8 * j, 8 * j + n)
        with chunk_context(ChunkContext(0, j, 3, 8 * j, n, cache)):
            attn(q[:, :, sl], k[:, :, sl], v[:, :, sl])
    plan = next(iter(cache._mbs[0].values())).plan[2]
    assert sorted({t.src for t in plan}) == [1, 2]  # chunk 0 lies wholly behind the window
    # Only queries 16..18 reach chunk 1 (keys 13..15): its tile is cropped to those rows.
    assert [(t.r0, t.r1) for t in plan if t.src == 1] == [(0, 3)]


def test_no_window_equals_plain_causal():
    q, k, v, g = make_qkv(4, 2, seq=20)
    ref_out, ref_grads = reference(q, k, v, g, None)
    out, grads, _ = chunked(ChunkedCausalAttention(window=None), q, k, v, g, [8, 7, 5])
    assert_same(out, grads, ref_out, ref_grads)
    # A window at least as long as the sequence is plain causal attention.
    out, grads, _ = chunked(ChunkedCausalAttention(window=20), q, k, v, g, [8, 7, 5])
    assert_same(out, grads, ref_out, ref_grads)


def test_bad_window_refused():
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match=r"window=.*positive integer"):
            ChunkedCausalAttention(window=bad)
    assert "window=4" in repr(ChunkedCausalAttention(window=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["blockwise", "sdpa"])
def test_window_cuda_float32(backend):
    lengths = [200, 136, 96, 80]
    q, k, v, g = make_qkv(8, 2, seq=sum(lengths), d=64)
    ids = doc_ids(q.shape[0], q.shape[2])
    ref_out, ref_grads = reference(q, k, v, g, 100, ids)
    cuda = [t.to("cuda", torch.float32) for t in (q, k, v, g)]
    out, grads, _ = chunked(ChunkedCausalAttention(backend=backend, window=100), *cuda, lengths, ids.cuda())
    for a, b in zip([out, *grads], [ref_out, *ref_grads]):
        assert ((a.double().cpu() - b).abs().max() / b.abs().max()) < 2e-5


@pytest.mark.slow
def test_window_compiled_op_float64():
    # The torch.compile path (the blockwise engine as an opaque custom op) with a window and documents.
    lengths = [8, 8, 8]
    q, k, v, g = make_qkv(4, 2, seq=24)
    ids = doc_ids(2, 24)
    ref_out, ref_grads = reference(q, k, v, g, 5, ids)
    attn = ChunkedCausalAttention(window=5)
    fn = torch.compile(lambda a, b, c, d: attn(a, b, c, document_ids=d), fullgraph=True)
    cache, outs, leaves = KVCache(), [], []
    for j, n in enumerate(lengths):
        sl = slice(8 * j, 8 * j + n)
        qj, kj, vj = (t[:, :, sl].detach().requires_grad_() for t in (q, k, v))
        with chunk_context(ChunkContext(0, j, 3, 8 * j, n, cache)):
            outs.append(fn(qj, kj, vj, ids[:, sl]))
        leaves.append((qj, kj, vj))
    for j in reversed(range(3)):
        outs[j].backward(g[:, :, 8 * j:8 * j + 8])
    out = torch.cat([o.detach() for o in outs], 2)
    assert_same(out, [torch.cat([lv[i].grad for lv in leaves], 2) for i in range(3)], ref_out, ref_grads)
    torch.testing.assert_close(fn(q, k, v, ids), ref_out, atol=TOL, rtol=0)


def _flash_mask(lq: int, lk: int, window_size) -> torch.Tensor:
    # flash-attn's documented rule: bottom-right aligned; query i sees keys in
    # [i + lk - lq - left, i + lk - lq + right], and causal caps right at 0.
    left = window_size[0]
    i = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None, :]
    return (j <= i) & ((j >= i - left) if left >= 0 else True)


def _fake_flash(q, k, v, causal, softmax_scale, window_size=(-1, -1)):
    qi, ki, vi = (t.transpose(1, 2) for t in (q, k, v))
    mask = _flash_mask(qi.shape[2], ki.shape[2], window_size)
    return F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale,
                                          enable_gqa=qi.shape[1] != ki.shape[1]).transpose(1, 2)


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size=(-1, -1)):
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (q[qs], k[ks], v[ks]))
        mask = _flash_mask(qi.shape[2], ki.shape[2], window_size)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale,
                                                   enable_gqa=qi.shape[1] != ki.shape[1])[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("window", [1, 4, 9])
def test_window_flash_bookkeeping(monkeypatch, docs, window):
    # flash-attn is not installed here: the window and segment bookkeeping against stand-ins
    # that follow flash-attn's documented window_size convention.
    monkeypatch.setattr(attention, "_flash_attn_func", _fake_flash)
    monkeypatch.setattr(attention, "_flash_attn_varlen_func", _fake_varlen)
    lengths = [11, 7, 6]
    q, k, v, g = make_qkv(4, 2, seq=24)
    ids = None
    if docs:  # contiguous documents (flash varlen needs runs)
        ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 10, [0] * 13 + [1] * 11])
    ref_out, ref_grads = reference(q, k, v, g, window, ids)
    out, grads, _ = chunked(ChunkedCausalAttention(backend="flash", window=window), q, k, v, g, lengths, ids)
    assert_same(out, grads, ref_out, ref_grads)
