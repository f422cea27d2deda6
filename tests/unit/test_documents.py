"""Document masks and MLA head sizes in ChunkedCausalAttention, in one process, float64."""

import pytest
import torch
import torch.nn.functional as F

from pipelining_seq import ChunkContext, ChunkedCausalAttention, ContractError, KVCache, attention, blockwise
from pipelining_seq.context import chunk_context
from tests.unit.test_attention import chunked_run as _plain_chunked_run


def chunked_run(attn, q, k, v, g, lengths, ids=None):
    """test_attention.chunked_run, passing each chunk its document ids."""
    return _plain_chunked_run(attn, q, k, v, g, lengths, ids=ids)


def ids_from_lengths(*rows):
    """[batch, seq] ids from per-row document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def block_causal_reference(q, k, v, g, ids):
    """Unchunked attention with an explicit block-causal mask (the definition)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    s = q.shape[2]
    mask = (ids[:, None, :, None] == ids[:, None, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ kk.transpose(-2, -1)) / q.shape[-1] ** 0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    out.backward(g)
    return out.detach(), [q.grad, k.grad, v.grad]


def make(hq=4, hkv=2, seq=24, d=8, dv=None, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq, d, dtype=dtype, generator=gen)
    k = torch.randn(batch, hkv, seq, d, dtype=dtype, generator=gen)
    v = torch.randn(batch, hkv, seq, dv or d, dtype=dtype, generator=gen)
    g = torch.randn(batch, hq, seq, dv or d, dtype=dtype, generator=gen)
    return q, k, v, g


# Row 0 / row 1 document lengths (each sums to 24).
LAYOUTS = {
    "crossing": ([5, 9, 10], [12, 12]),        # documents cross chunk boundaries
    "one_doc": ([24], [24]),                    # one document spans every chunk
    "single_tokens": ([1] * 24, [1, 1, 20, 1, 1]),
    "at_boundary": ([6, 6, 12], [6, 18]),       # chunks of 6 start exactly at a document start
    "mixed": ([3, 1, 13, 7], [24]),
}


@pytest.mark.parametrize("backend,tile", [("blockwise", 256), ("blockwise", 3), ("sdpa", 256)])
@pytest.mark.parametrize("lengths", [[24], [6, 6, 6, 6], [11, 7, 4, 2], [1, 22, 1]])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_documents_equal_block_causal(backend, tile, lengths, layout, monkeypatch):
    monkeypatch.setattr(blockwise, "TILE", tile)
    ids = ids_from_lengths(*LAYOUTS[layout])
    q, k, v, g = make()
    ref_out, ref_grads = block_causal_reference(q, k, v, g, ids)
    out, grads, cache = chunked_run(ChunkedCausalAttention(backend=backend), q, k, v, g, lengths, ids)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    entry = next(iter(cache._mbs[0].values()))
    assert all(t is None for t in (*entry.k, *entry.v, *entry.dk, *entry.dv, *entry.ids))


def test_whole_sequence_outside_pipeline_is_block_causal():
    ids = ids_from_lengths(*LAYOUTS["crossing"])
    q, k, v, g = make(dv=6)
    ref_out, _ = block_causal_reference(q, k, v, g, ids)
    out = ChunkedCausalAttention()(q, k, v, document_ids=ids)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)


def test_unreachable_cached_chunks_are_not_read(monkeypatch):
    # Chunks of 6; documents start at 0, 6, 12, 18 (chunk boundaries) and 20: no chunk reads the cache.
    ids = ids_from_lengths([6, 6, 6, 2, 4], [6, 6, 6, 2, 4])
    q, k, v, g = make()
    cache = KVCache()
    attn = ChunkedCausalAttention()
    for j in range(4):
        sl = slice(6 * j, 6 * j + 6)
        with chunk_context(ChunkContext(0, j, 4, 6 * j, 6, cache)):
            attn(q[:, :, sl], k[:, :, sl], v[:, :, sl], document_ids=ids[:, sl])
    plans = next(iter(cache._mbs[0].values())).plan
    assert [sorted({t.src for t in p}) for p in plans] == [[0], [1], [2], [3]]
    # Chunk 3 holds documents 3 (tokens 18, 19) and 4: its own block is masked.
    assert all(t.mask is not None for t in plans[3])
    # A document continuing from chunk 0 into chunk 1 makes only that cached tile reachable, cropped.
    monkeypatch.setattr(blockwise, "TILE", 2)
    cache = KVCache()
    ids = ids_from_lengths([5, 3, 16], [5, 3, 16])
    for j in range(2):
        sl = slice(6 * j, 6 * j + 6)
        with chunk_context(ChunkContext(0, j, 4, 6 * j, 6, cache)):
            attn(q[:, :, sl], k[:, :, sl], v[:, :, sl], document_ids=ids[:, sl])
    plan = next(iter(cache._mbs[0].values())).plan[1]
    cached = [t for t in plan if t.src == 0]
    assert [(t.k0, t.k1, t.r0, t.r1) for t in cached] == [(4, 6, 0, 2)]  # keys 5, query rows 6, 7


@pytest.mark.parametrize("backend", ["blockwise", "sdpa"])
@pytest.mark.parametrize("dv", [4, 8, 12])
@pytest.mark.parametrize("with_ids", [False, True])
def test_value_head_size(backend, dv, with_ids):
    # MLA: v head size 4 / 12 against q/k 8; grouped-query heads as well.
    q, k, v, g = make(hq=4, hkv=2, d=8, dv=dv)
    ids = ids_from_lengths(*LAYOUTS["crossing"]) if with_ids else torch.zeros(2, 24, dtype=torch.long)
    ref_out, ref_grads = block_causal_reference(q, k, v, g, ids)
    out, grads, _ = chunked_run(ChunkedCausalAttention(backend=backend), q, k, v, g, [11, 7, 6],
                                ids if with_ids else None)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    # flash-attn's varlen contract, one SDPA per segment (bottom-right causal).
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (q[qs], k[ks], v[ks]))
        lq, lk = qi.shape[2], ki.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale,
                                           enable_gqa=qi.shape[1] != ki.shape[1])
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def _fake_flash(q, k, v, causal, softmax_scale):
    qi, ki, vi = (t.transpose(1, 2) for t in (q, k, v))
    lq, lk = qi.shape[2], ki.shape[2]
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale,
                                          enable_gqa=qi.shape[1] != ki.shape[1]).transpose(1, 2)


@pytest.mark.parametrize("layout", ["crossing", "single_tokens", "at_boundary"])
def test_flash_varlen_segments(layout, monkeypatch):
    # flash-attn is not installed here: check the segment bookkeeping against a stand-in.
    monkeypatch.setattr(attention, "_flash_attn_func", _fake_flash)
    monkeypatch.setattr(attention, "_flash_attn_varlen_func", _fake_varlen)
    ids = ids_from_lengths(*LAYOUTS[layout])
    q, k, v, g = make(dv=6)
    ref_out, ref_grads = block_causal_reference(q, k, v, g, ids)
    out, grads, _ = chunked_run(ChunkedCausalAttention(backend="flash"), q, k, v, g, [11, 7, 6], ids)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_flash_refuses_split_documents(monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn_func", _fake_flash)
    monkeypatch.setattr(attention, "_flash_attn_varlen_func", _fake_varlen)
    q, k, v, g = make(seq=8)
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]] * 2)
    with pytest.raises(ContractError, match="contiguous run"):
        chunked_run(ChunkedCausalAttention(backend="flash"), q, k, v, g, [4, 4], ids)


def test_bad_document_ids_and_shapes():
    attn = ChunkedCausalAttention()
    q, k, v, _ = make(seq=8)
    with pytest.raises(ContractError, match=r"document_ids has shape \(2, 7\)"):
        attn(q, k, v, document_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ContractError, match="integer tensor"):
        attn(q, k, v, document_ids=torch.zeros(2, 8))
    with pytest.raises(ContractError, match="integer tensor"):
        attn(q, k, v, document_ids=torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ContractError, match="v must have k's batch, heads and seq"):
        attn(q, k, v[:, :, :7])
    with pytest.raises(ContractError, match="v must have k's batch, heads and seq"):
        attn(q, k, v[:1])
    cache = KVCache()
    with chunk_context(ChunkContext(0, 0, 2, 0, 4, cache)):
        with pytest.raises(ContractError, match="has 4"):
            attn(q, k, v, document_ids=torch.zeros(2, 8, dtype=torch.long))
        attn(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    with chunk_context(ChunkContext(0, 1, 2, 4, 4, cache)):
        with pytest.raises(ContractError, match="every chunk or for none"):
            attn(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], document_ids=torch.zeros(2, 4, dtype=torch.long))


def test_bfloat16_documents_close():
    ids = ids_from_lengths([20, 30, 14], [64])
    q, k, v, g = make(hq=4, hkv=2, seq=64, d=16, dv=8, dtype=torch.bfloat16)
    ref_out, ref_grads = block_causal_reference(q.double(), k.double(), v.double(), g.double(), ids)
    out, grads, _ = chunked_run(ChunkedCausalAttention(), q, k, v, g, [28, 20, 16], ids)
    assert (out.double() - ref_out).abs().max() < 3e-2
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() / b.abs().max() < 3e-2


def test_bench_documents_smoke(tmp_path):
    from pipelining_seq.tools.bench import documents

    ids = documents.random_documents(2, 64, 5, seed=0)
    assert ids.shape == (2, 64) and all(int(r.max()) == 4 for r in ids)
    rows = documents.run(seq_len=64, chunks=4, docs=4, batch=1, heads=2, kv_heads=1, head_dim=8, v_head_dim=4,
                         dtype=torch.float32, device=torch.device("cpu"), repeats=1, warmup=0, seed=0)
    assert [r["variant"] for r in rows] == ["causal (no documents)", "4 documents"] and rows[0]["vs_causal"] == 1
