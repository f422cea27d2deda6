"""Chunked attention against full causal attention, in one process."""

import pytest
import torch
import torch.nn.functional as F

from pipelining_seq import ChunkContext, ChunkedCausalAttention, ContractError, KVCache, chunk_positions
from pipelining_seq.context import chunk_context


def chunked_run(attn, q, k, v, g, lengths, order=None, *, ids=None):
    """Forward chunks in order (each with its slice of the document ``ids``, if given), backward
    in ``order`` (default reverse); return out, grads and the K/V cache."""
    cache = KVCache()
    offs = [sum(lengths[:j]) for j in range(len(lengths))]
    outs, leaves = [], []
    for j, n in enumerate(lengths):
        sl = slice(offs[j], offs[j] + n)
        qj, kj, vj = (t[:, :, sl].detach().requires_grad_() for t in (q, k, v))
        with chunk_context(ChunkContext(0, j, len(lengths), offs[j], n, cache)):
            outs.append(attn(qj, kj, vj) if ids is None else attn(qj, kj, vj, document_ids=ids[:, sl]))
        leaves.append((qj, kj, vj))
    for j in order or reversed(range(len(lengths))):
        outs[j].backward(g[:, :, offs[j]:offs[j] + lengths[j]])
    out = torch.cat([o.detach() for o in outs], 2)
    grads = [torch.cat([lv[i].grad for lv in leaves], 2) for i in range(3)]
    return out, grads, cache


def make_qkv(hq=4, hkv=4, seq=24, dtype=torch.float64, batch=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq, d, dtype=dtype, generator=g)
    k = torch.randn(batch, hkv, seq, d, dtype=dtype, generator=g)
    v = torch.randn(batch, hkv, seq, d, dtype=dtype, generator=g)
    return q, k, v, torch.randn(batch, hq, seq, d, dtype=dtype, generator=g)


def reference(q, k, v, g):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(g)
    return out.detach(), [q.grad, k.grad, v.grad]


@pytest.mark.parametrize("backend", ["blockwise", "sdpa"])
@pytest.mark.parametrize("lengths", [[24], [12, 12], [6, 6, 6, 6], [11, 7, 4, 2], [1, 22, 1], [3] * 8])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_chunked_equals_full_float64(backend, lengths, heads):
    q, k, v, g = make_qkv(*heads, seq=sum(lengths))
    ref_out, ref_grads = reference(q, k, v, g)
    out, grads, cache = chunked_run(ChunkedCausalAttention(backend=backend), q, k, v, g, lengths)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # Every chunk released its K/V and relayed gradients after its backward.
    entry = next(iter(cache._mbs[0].values()))
    assert all(t is None for t in (*entry.k, *entry.v, *entry.dk, *entry.dv))


def test_without_relay_gradients_differ():
    # Negative control: cutting the chunks apart without the K/V cache is wrong.
    q, k, v, g = make_qkv(seq=16)
    _, ref_grads = reference(q, k, v, g)
    attn = ChunkedCausalAttention()
    grads = []
    for sl in (slice(0, 8), slice(8, 16)):
        qj, kj, vj = (t[:, :, sl].detach().requires_grad_() for t in (q, k, v))
        attn(qj, kj, vj).backward(g[:, :, sl])
        grads.append(kj.grad)
    assert (torch.cat(grads, 2) - ref_grads[1]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["blockwise", "sdpa"])
def test_bfloat16_close(backend):
    q, k, v, g = make_qkv(hq=4, hkv=2, seq=64, d=32, dtype=torch.bfloat16)
    ref_out, ref_grads = reference(q.double(), k.double(), v.double(), g.double())
    out, grads, _ = chunked_run(ChunkedCausalAttention(backend=backend), q, k, v, g, [28, 20, 16])
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=0)
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() / b.abs().max() < 3e-2


@pytest.mark.parametrize("backend", ["blockwise", "sdpa"])
def test_wrong_backward_order_is_caught(backend):
    q, k, v, g = make_qkv(seq=16)
    with pytest.raises(ContractError, match="reverse chunk order"):
        chunked_run(ChunkedCausalAttention(backend=backend), q, k, v, g, [8, 8], order=[0, 1])


def test_outside_pipeline_is_plain_causal():
    q, k, v, _ = make_qkv(hq=4, hkv=2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(ChunkedCausalAttention()(q, k, v), ref)
    assert torch.equal(chunk_positions(5), torch.arange(5))


def test_contract_errors():
    attn = ChunkedCausalAttention()
    q, k, v, _ = make_qkv(hq=4, hkv=3, seq=8)
    with pytest.raises(ContractError, match="multiple of"):
        attn(q, k, v)
    with pytest.raises(ContractError, match=r"\[batch, heads, seq, head_dim\]"):
        attn(q[0], k[0], v[0])
    q, k, v, _ = make_qkv(seq=8)
    cache = KVCache()
    with chunk_context(ChunkContext(0, 0, 2, 0, 4, cache)):
        with pytest.raises(ContractError, match="has 4"):
            attn(q, k, v)
        with pytest.raises(ContractError, match="has 4 tokens"):
            chunk_positions(8)
        assert chunk_positions(4).tolist() == [0, 1, 2, 3]
        attn(q[:, :, :4], k[:, :, :4], v[:, :, :4])
        with pytest.raises(ContractError, match="one instance per attention layer"):
            attn(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    with chunk_context(ChunkContext(0, 1, 2, 4, 4, cache)):
        assert chunk_positions(4).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="backend"):
        ChunkedCausalAttention(backend="xformers")


def test_activation_checkpoint_single_process():
    # Recompute inside the chunk's backward must reuse the cache, not append twice.
    from pipelining_seq.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = dict(vocab_size=32, n_layers=2, dim=16, n_heads=4, n_kv_heads=2)
    ref = GPT(GPTConfig(**cfg)).double()
    ck = GPT(GPTConfig(**cfg, activation_checkpoint=True)).double()
    ck.load_state_dict(ref.state_dict())
    x = torch.randint(0, 32, (2, 12))
    ref(x).sum().backward()
    cache = KVCache()
    lengths, outs = [5, 4, 3], []
    for j, n in enumerate(lengths):
        off = sum(lengths[:j])
        with chunk_context(ChunkContext(0, j, 3, off, n, cache)):
            outs.append(ck(x[:, off:off + n]))
    for j in reversed(range(3)):
        off = sum(lengths[:j])
        with chunk_context(ChunkContext(0, j, 3, off, lengths[j], cache, recompute=True)):
            outs[j].sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ck.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0, msg=lambda m, name=n: f"{name}: {m}")


CUDA_BACKENDS = ["blockwise", "sdpa"] + (["flash"] if __import__("pipelining_seq").attention.flash_attn_available() else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parity(backend, dtype):
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn has no float32 kernels")
    q, k, v, g = make_qkv(hq=8, hkv=2, seq=512, d=64, dtype=torch.float64)
    ref_out, ref_grads = reference(q, k, v, g)
    cuda = [t.to("cuda", dtype) for t in (q, k, v, g)]
    out, grads, _ = chunked_run(ChunkedCausalAttention(backend=backend), *cuda, [200, 136, 96, 80])
    errs = [((a.double().cpu() - b).abs().max() / b.abs().max()).item()
            for a, b in zip([out, *grads], [ref_out, *ref_grads])]
    shown = " ".join(f"{e:.2e}" for e in errs)
    print(f"cuda parity {backend} {dtype}: rel max err out/dq/dk/dv = {shown}")
    assert max(errs) < (2e-5 if dtype == torch.float32 else 3e-2)
