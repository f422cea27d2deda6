"""The Hugging Face transformers adapter: enable, split_causal_lm, the FLOP partition, and
Seq1F1B on 2 gloo ranks against the stock transformers model in one process (float64)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from pipelining_seq import ChunkContext, ContractError, KVCache  # noqa: E402
from pipelining_seq.context import chunk_context  # noqa: E402
from pipelining_seq.integrations.transformers import (  # noqa: E402
    IMPLEMENTATION,
    balanced_partition_from_config,
    balanced_seq_partition,
    enable,
    flop_model_from_config,
    split_causal_lm,
)
from pipelining_seq.partition import resolve_partition  # noqa: E402
from pipelining_seq.tools.testing import run_ranks  # noqa: E402
from tests.workers.hf_worker import (  # noqa: E402
    ce_loss,
    hf_worker,
    make_batch,
    make_model,
    packed_positions,
    run_case,
    stock_forward,
)

TOL = 1e-10
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gemma3(**over):
    cfg = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, intermediate_size=128, sliding_window=6, query_pre_attn_scalar=16,
               layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.2)
    cfg.update(over)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**cfg, attn_implementation="sdpa")).double()


MODELS = {
    "llama": lambda: make_model("llama"),
    "qwen2-window": lambda: make_model("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "qwen3": lambda: make_model("qwen3"),
    "mistral-window": lambda: make_model("mistral", sliding_window=7),
    "gemma3-alternating": gemma3,
}


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads(got: dict, want: dict, atol: float = TOL):
    assert set(got) == set(want)
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def chunked_run(model, x, y, lengths, **kw):
    """The model over sequence chunks in one process (forwards in order, backwards in
    reverse, as a Seq1F1B stage runs them); returns the loss and the gradients."""
    cache, losses = KVCache(), []
    offs = [sum(lengths[:j]) for j in range(len(lengths))]
    for j, (off, n) in enumerate(zip(offs, lengths)):
        sl = slice(off, off + n)
        with chunk_context(ChunkContext(0, j, len(lengths), off, n, cache)):
            logits = model(x[:, sl], **{k: v[:, sl] for k, v in kw.items()}).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), y[:, sl].flatten(), reduction="sum") / y.numel())
    for j in reversed(range(len(lengths))):
        with chunk_context(ChunkContext(0, j, len(lengths), offs[j], lengths[j], cache, recompute=True)):
            losses[j].backward()
    return sum(loss.detach() for loss in losses), grads_of(model)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("packed", [False, True])
def test_enable_equals_stock_whole_and_chunked(name, packed):
    x, y, _ = make_batch(dict(batch=2, seq=24))
    kw = {"position_ids": packed_positions(2, 24)} if packed else {}
    stock = MODELS[name]()
    loss = ce_loss(stock(x, use_cache=False, **kw).logits, y)
    loss.backward()
    ref = grads_of(stock)
    model = enable(MODELS[name]())
    assert model.config._attn_implementation == IMPLEMENTATION
    whole = ce_loss(model(x, **kw).logits, y)
    whole.backward()
    torch.testing.assert_close(whole, loss, rtol=0, atol=TOL)
    assert_grads(grads_of(model), ref)
    model.zero_grad(set_to_none=True)
    chunked, grads = chunked_run(model, x, y, [9, 7, 5, 3], **kw)
    torch.testing.assert_close(chunked, loss.detach(), rtol=0, atol=TOL)
    # Gemma's RMSNorm computes in float32 even in a float64 model: its weight gradients are
    # sums over tokens in float32, which chunking regroups (float32-level differences).
    assert_grads(grads, ref, atol=1e-7 if name.startswith("gemma") else TOL)


def test_windows_per_layer():
    windows = {n: m.seq1f1b_attention.window for n, m in enable(MODELS["qwen2-window"]()).named_modules()
               if hasattr(m, "seq1f1b_attention")}
    assert list(windows.values()) == [None, None, 5, 5]  # max_window_layers=2: layers >= 2 slide
    mistral = enable(MODELS["mistral-window"]())
    assert {m.seq1f1b_attention.window for m in mistral.modules() if hasattr(m, "seq1f1b_attention")} == {7}
    gem = enable(gemma3())
    assert [m.seq1f1b_attention.window for m in gem.modules() if hasattr(m, "seq1f1b_attention")] == [6, None] * 2
    llama = enable(make_model("llama"))
    layer0 = llama.model.layers[0].self_attn
    assert layer0.seq1f1b_attention.scale == layer0.scaling
    # One instance per attention module, none shared; enable is idempotent.
    insts = [m.seq1f1b_attention for m in llama.modules() if hasattr(m, "seq1f1b_attention")]
    assert len({id(a) for a in insts}) == 4
    enable(llama)
    assert [m.seq1f1b_attention for m in llama.modules() if hasattr(m, "seq1f1b_attention")] == insts


def test_document_ids_equal_a_block_causal_mask():
    x, y, kw = make_batch(dict(batch=2, seq=24, docs="document_ids"))
    stock = make_model("mistral", sliding_window=6)
    loss = ce_loss(stock_forward(stock, x, kw), y)
    loss.backward()
    model = enable(make_model("mistral", sliding_window=6))
    chunked, grads = chunked_run(model, x, y, [8, 8, 8], **kw)
    torch.testing.assert_close(chunked, loss.detach(), rtol=0, atol=TOL)
    assert_grads(grads, grads_of(stock))


def test_negative_controls():
    # Left as it was, the stock model over chunks is wrong: the checks above can fail.
    x, y, _ = make_batch(dict(batch=2, seq=24))
    stock = make_model("llama")
    loss = ce_loss(stock(x, use_cache=False).logits, y)
    wrong, _ = chunked_run(stock, x, y, [8, 8, 8])
    assert abs(wrong - loss.detach()) > 1e-3
    # A window the attention ignored would be wrong too.
    windowed = make_model("mistral", sliding_window=4)
    assert abs(ce_loss(windowed(x, use_cache=False).logits, y) - loss) > 1e-3


# --------------------------------------------------------------------------- refusals
def _with_sinks():
    model = make_model("llama")
    model.model.layers[1].self_attn.sinks = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    return model


@pytest.mark.parametrize("build,match", [
    (lambda: make_model("llama", attention_dropout=0.1), r"config.attention_dropout=0.1"),
    (lambda: gemma3(attn_logit_softcapping=50.0), r"config.attn_logit_softcapping=50.0"),
    (lambda: gemma3(use_bidirectional_attention=True), r"config.use_bidirectional_attention"),
    (_with_sinks, r"model.layers.1.self_attn.sinks"),
])
def test_enable_refuses(build, match):
    with pytest.raises(ContractError, match=match):
        enable(build())


def test_enable_refuses_unknown_layer_type():
    model = make_model("qwen2")
    model.config.layer_types[2] = "linear_attention"
    with pytest.raises(ContractError, match=r"config.layer_types\[2\]='linear_attention'"):
        enable(model)


def test_runtime_refusals():
    x, _, _ = make_batch(dict(batch=2, seq=16))
    model = enable(make_model("llama"))
    with pytest.raises(ContractError, match="attention_mask with padding"):
        model(x, attention_mask=torch.ones(2, 16, dtype=torch.long).tril())
    model(x, attention_mask=torch.ones(2, 16, dtype=torch.long))  # no padding: accepted
    with pytest.raises(ContractError, match="jump forward by more than one"):
        model(x, position_ids=torch.tensor([[0, 1, 2, 5] * 4] * 2))
    # A jump exactly at a chunk boundary is seen by the next chunk.
    pos = torch.cat([torch.arange(8), torch.arange(20, 28)]).repeat(2, 1)
    cache = KVCache()
    with chunk_context(ChunkContext(0, 0, 2, 0, 8, cache)):
        model(x[:, :8], position_ids=pos[:, :8])
    with chunk_context(ChunkContext(0, 1, 2, 8, 8, cache)), pytest.raises(ContractError, match="jump forward"):
        model(x[:, 8:], position_ids=pos[:, 8:])
    # The window the module asks for must be the one enable() gave it.
    mistral = enable(make_model("mistral", sliding_window=6))
    mistral.config.sliding_window = 3
    with pytest.raises(ContractError, match="sliding_window=3 but enable"):
        mistral(x)
    # Generation with a K/V cache is not what the adapter runs.
    with pytest.raises(ContractError, match="use_cache=False"):
        model.generate(x[:, :4], max_new_tokens=2, do_sample=False)
    # A module whose attention was never enabled.
    stray = make_model("llama")
    stray.set_attn_implementation(IMPLEMENTATION)
    with pytest.raises(ContractError, match="call pipelining_seq.integrations.transformers.enable"):
        stray(x)


# ----------------------------------------------------------------------------- split
def test_split_names_load_and_whole_parity(tmp_path):
    from safetensors.torch import load_file

    source = make_model("qwen2", seed=3)
    source.save_pretrained(tmp_path)
    checkpoint = load_file(os.path.join(tmp_path, "model.safetensors"))
    model = make_model("qwen2")
    names = set(model.state_dict())
    stages = [split_causal_lm(model, s, 3, layers_per_stage=[1, 2, 1]) for s in range(3)]
    keys = [set(st.state_dict()) for st in stages]
    assert set().union(*keys) == names and sum(len(k) for k in keys) == len(names)
    assert "model.layers.2.self_attn.q_proj.weight" in keys[1] and "lm_head.weight" in keys[2]
    assert "model.embed_tokens.weight" in keys[0]
    for st in stages:
        st.load_state_dict({k: v for k, v in checkpoint.items() if k in st.state_dict()}, strict=True)
    x, _, _ = make_batch(dict(batch=2, seq=16))
    h = x
    for st in stages:
        h = st(h)
    torch.testing.assert_close(h, source(x, use_cache=False).logits, rtol=0, atol=TOL)
    assert dict(stages[1].named_parameters())["model.layers.1.mlp.up_proj.weight"] is model.model.layers[1].mlp.up_proj.weight


def test_split_refusals():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"layers_per_stage=\[1, 2\] sums to 3 but the model has 4 layers"):
        split_causal_lm(model, 0, 2, layers_per_stage=[1, 2])
    with pytest.raises(ValueError, match="has 3 entries but n_stages=2"):
        split_causal_lm(model, 0, 2, layers_per_stage=[1, 2, 1])
    with pytest.raises(ValueError, match="positive integer number of layers"):
        split_causal_lm(model, 0, 2, layers_per_stage=[0, 4])
    with pytest.raises(ValueError, match="every stage needs at least one layer"):
        split_causal_lm(model, 0, 5)
    with pytest.raises(ValueError, match="stage_index=2"):
        split_causal_lm(model, 2, 2)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        split_causal_lm(make_model("llama", tie_word_embeddings=True), 0, 2)
    with pytest.raises(ValueError, match="split_causal_lm supports model types"):
        split_causal_lm(gemma3(), 0, 2)


# ------------------------------------------------------------------------- partition
def test_flop_model_from_config():
    cfg = make_model("llama").config
    fm = flop_model_from_config(cfg)
    assert (fm.num_layers, fm.hidden_size, fm.num_heads, fm.ffn_hidden_size, fm.vocab_size, fm.num_kv_heads,
            fm.mlp, fm.head_dim) == (4, 64, 4, 128, 256, 2, "swiglu", 16)
    lengths = balanced_partition_from_config(cfg, 4096, 4)
    assert sum(lengths) == 4096 and lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert resolve_partition(balanced_seq_partition(cfg, 4), 4096, 4) == lengths
    with pytest.raises(ValueError, match="pass mlp='swiglu'"):
        flop_model_from_config(gemma3().config)
    assert flop_model_from_config(gemma3().config, mlp="swiglu").head_dim == 16


# ------------------------------------------------------------------ Seq1F1B, 2 ranks
CASES = {
    "llama": [
        dict(family="llama", m=2, k=2, batch=4, seq=32),
        dict(family="llama", m=2, k=4, batch=4, seq=32, docs="document_ids", partition="balanced"),
        dict(family="llama", m=2, k=4, batch=4, seq=32, docs="position_ids", checkpoint=True,
             layers_per_stage=[1, 3], eval=True),
    ],
    "qwen2": [
        dict(family="qwen2", m=2, k=4, batch=4, seq=32,
             config=dict(use_sliding_window=True, sliding_window=12, max_window_layers=1)),
        dict(family="qwen2", m=2, k=2, batch=4, seq=32, docs="position_ids",
             config=dict(use_sliding_window=True, sliding_window=12, max_window_layers=1)),
    ],
    "mistral": [
        dict(family="mistral", m=2, k=4, batch=4, seq=32, config=dict(sliding_window=12), eval=True),
        dict(family="mistral", m=2, k=2, batch=4, seq=32, config=dict(sliding_window=12), docs="position_ids",
             checkpoint=True),
        dict(family="mistral", m=2, k=4, batch=4, seq=32, config=dict(sliding_window=12), docs="document_ids",
             partition="balanced"),
    ],
}


def check_results(cases: list[dict], results: list[list[dict]]) -> None:
    """results[rank][case]: every gradient on every rank, the losses on the last."""
    last_rank = len(results) - 1
    for i, case in enumerate(cases):
        names = set()
        for rank in range(len(results)):
            res = results[rank][i]
            assert res["leftover"] == 0
            for n, g in res["grads"].items():
                torch.testing.assert_close(g, res["ref_grads"][n], rtol=0, atol=TOL, msg=lambda m, n=n, c=case: f"{c}: {n}: {m}")
            names |= set(res["grads"])
        assert names == set(results[0][i]["all_names"]), "every parameter of the model is on some stage"
        last = results[last_rank][i]
        assert len(last["losses"]) == case["m"]
        torch.testing.assert_close(torch.stack(last["losses"]), last["ref_losses"], rtol=0, atol=TOL)
        if case.get("eval"):
            torch.testing.assert_close(torch.stack(last["evals"]), last["ref_losses"], rtol=0, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_seq1f1b_parity_with_stock_model(family):
    check_results(CASES[family], run_ranks(hf_worker, 2, CASES[family], timeout_s=600))


@pytest.mark.slow
@pytest.mark.usefixtures("world_of_one")
def test_seq1f1b_one_rank_qwen3():
    # One stage holding the whole Qwen3 (q/k norms), k=4 uneven balanced chunks, packed positions, eval.
    case = dict(family="qwen3", m=2, k=4, batch=4, seq=32, docs="position_ids", partition="balanced", eval=True)
    check_results([case], [[run_case(0, 1, case)]])


@pytest.mark.slow
def test_example_script_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "transformers_llama.py"), "--steps", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1 loss" in out.stdout
