"""Exact on real training data: packed documents, masked targets, MLA head sizes, compiled
blocks, against an unchunked model with an explicit block-causal mask (float64, 1e-10);
and the guard that refuses attention bypassing ChunkedCausalAttention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelining_seq import ContractError, ScheduleSeq1F1B, SequencePipelineStage
from pipelining_seq.losses import chunk_loss_weights
from pipelining_seq.models import GPT, GPTConfig, document_ids_from_tokens
from pipelining_seq.tools.testing import run_ranks
from tests.workers.exact_worker import exact_worker, run_config
from tests.workers.parity_worker import ce_loss, make_batch, make_model

TOL = 1e-10


def check(res, *, last=True, equal_nan=False):
    for n, g in res["grads"].items():
        torch.testing.assert_close(g, res["ref_grads"][n], rtol=0, atol=TOL, equal_nan=equal_nan, msg=n)
    assert res["leftover"] == 0, "K/V cache not empty after the step"
    if last:
        cfg = res["cfg"]
        assert len(res["losses"]) == cfg["m"]
        torch.testing.assert_close(torch.stack(res["losses"]), res["ref_losses"], rtol=0, atol=TOL, equal_nan=equal_nan)
        if cfg.get("eval"):
            torch.testing.assert_close(torch.stack(res["evals"]), res["ref_losses"], rtol=0, atol=TOL,
                                       equal_nan=equal_nan)


ONE_RANK = [
    dict(m=2, k=3, batch=4, seq=18, docs="crossing"),
    dict(m=2, k=3, batch=4, seq=18, docs="at_boundary", partition=(6, 6, 6), eval=True),
    dict(m=1, k=4, batch=2, seq=16, docs="single_tokens", partition=(7, 5, 3, 1)),
    dict(m=2, k=2, batch=2, seq=16, docs="one_doc", model=dict(activation_checkpoint=True)),
    dict(m=2, k=3, batch=4, seq=18, targets="prompt", partition=(8, 6, 4)),
    dict(m=2, k=3, batch=4, seq=18, targets="padded", docs="crossing", eval=True),
    dict(m=2, k=3, batch=4, seq=18, targets="one_mb_masked", loss="safe", docs="at_boundary"),
    dict(m=2, k=3, batch=4, seq=18, docs="crossing", model=dict(v_head_dim=12, n_kv_heads=2)),
    dict(m=2, k=2, batch=2, seq=16, docs="crossing", model=dict(v_head_dim=4, attn_backend="sdpa")),
]


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("cfg", ONE_RANK, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_one_rank(cfg):
    check(run_config(0, 1, cfg))


@pytest.mark.usefixtures("world_of_one")
def test_fully_masked_microbatch_is_nan_as_under_1f1b():
    # cross_entropy's mean over no target is NaN; Seq1F1B gives the same NaN, and only there.
    res = run_config(0, 1, dict(m=2, k=3, batch=4, seq=18, targets="one_mb_masked"))
    assert torch.isnan(res["ref_losses"][0]) and torch.isnan(res["losses"][0])
    check(res, equal_nan=True)


@pytest.mark.usefixtures("world_of_one")
def test_issue_example_masked_prompt():
    # m=1, chunks [8, 4, 4], first 6 of 16 targets ignored: length weights were 0.017 off.
    model = make_model()
    stage = SequencePipelineStage(model, 0, 1, torch.device("cpu"))
    sched = ScheduleSeq1F1B(stage, 1, ce_loss, n_seq_chunks=3, seq_partition=[8, 4, 4])
    x, y = make_batch(1, 16)
    y[:, :6] = -100
    losses = []
    sched.step(x, target=y, losses=losses)
    ref = make_model()
    loss = ce_loss(ref(x), y)
    loss.backward()
    torch.testing.assert_close(losses[0], loss.detach(), rtol=0, atol=1e-12)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=n)


def test_loss_weights():
    y = torch.tensor([[-100, -100, 1, 2, 3, -100]])
    units = list(y.split([2, 2, 2], dim=1))
    assert chunk_loss_weights(units, n_chunks=3, lengths=[2, 2, 2], ignore_index=-100) == [0, 2 / 3, 1 / 3]
    assert chunk_loss_weights(units, n_chunks=3, lengths=[2, 2, 2], ignore_index=None) == [1 / 3] * 3
    soft = [torch.rand(1, 2, 5) for _ in range(3)]
    assert chunk_loss_weights(soft, n_chunks=3, lengths=[2, 2, 2], ignore_index=-100) == [1 / 3] * 3
    soft[1][0, 0, 0] = -100
    with pytest.raises(ValueError, match="ignore_index=-100.*integer targets"):
        chunk_loss_weights(soft, n_chunks=3, lengths=[2, 2, 2], ignore_index=-100)


@pytest.mark.usefixtures("world_of_one")
def test_bad_input_errors():
    stage = SequencePipelineStage(make_model(), 0, 1, torch.device("cpu"))
    with pytest.raises(TypeError, match="ignore_index=1.5"):
        ScheduleSeq1F1B(stage, 2, ce_loss, n_seq_chunks=2, ignore_index=1.5)
    sched = ScheduleSeq1F1B(stage, 2, ce_loss, n_seq_chunks=2)
    x, y = make_batch(2, 16)
    with pytest.raises(ValueError, match="disagree on the sequence length"):
        sched.step(x, target=y, document_ids=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ContractError, match=r"step\(document_ids=...\) must be an integer tensor"):
        sched.step(x, target=y, document_ids=torch.zeros(2, 16))
    with pytest.raises(ContractError, match=r"shape \(1, 16\), expected \[batch, seq\] with batch 2"):
        sched.step(x, target=y, document_ids=torch.zeros(1, 16, dtype=torch.long))
    assert all(p.grad is None for p in stage.submod.parameters())


def test_document_ids_from_tokens_and_eos_model():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 0, 3]])
    assert document_ids_from_tokens(tokens, eos_id=0).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    torch.manual_seed(0)
    cfg = dict(vocab_size=16, n_layers=1, dim=16, n_heads=2)
    with_eos = GPT(GPTConfig(**cfg, eos_id=0)).double()
    explicit = GPT(GPTConfig(**cfg)).double()
    explicit.load_state_dict(with_eos.state_dict())
    torch.testing.assert_close(with_eos(tokens), explicit(tokens, document_ids=document_ids_from_tokens(tokens, eos_id=0)))
    assert not torch.allclose(with_eos(tokens), explicit(tokens))
    from pipelining_seq import ChunkContext, KVCache
    from pipelining_seq.context import chunk_context

    with chunk_context(ChunkContext(0, 0, 2, 0, 7, KVCache())), pytest.raises(ContractError, match="inside a sequence"):
        with_eos(tokens)


class SelfAttending(nn.Module):
    """A model that ignores the contract: it calls SDPA itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 16)
        self.out = nn.Linear(16, 64)

    def forward(self, x):
        h = self.emb(x).double()
        q = h.view(h.shape[0], h.shape[1], 2, 8).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return self.out.double()(y.transpose(1, 2).reshape(h.shape))


@pytest.mark.usefixtures("world_of_one")
def test_negative_control_model_calling_sdpa_is_refused():
    x, y = make_batch(2, 16)
    stage = SequencePipelineStage(SelfAttending(), 0, 1, torch.device("cpu"))
    with pytest.raises(ContractError, match="scaled_dot_product_attention called inside stage 0's forward"):
        ScheduleSeq1F1B(stage, 2, ce_loss, n_seq_chunks=2).step(x, target=y)
    # One chunk per micro-batch is plain 1F1B: allowed, and nothing changes outside units.
    ScheduleSeq1F1B(SequencePipelineStage(SelfAttending(), 0, 1, torch.device("cpu")), 2, ce_loss,
                    n_seq_chunks=1).step(x, target=y)
    SelfAttending()(x)


def test_guard_catches_flex_flash_and_aten():
    from torch.nn.attention.flex_attention import flex_attention

    from pipelining_seq.guard import chunked_unit

    q = torch.randn(1, 2, 8, 8)
    calls = {
        "flex_attention": lambda: flex_attention(q, q, q),
        "_scaled_dot_product_flash_attention_for_cpu":
            lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True),
        "flash_attn": lambda: torch.ops.flash_attn_guard_test.fwd(q),
        "scaled_dot_product_attention": lambda: torch._C._nn.scaled_dot_product_attention(q, q, q),
    }
    for name, call in calls.items():
        with pytest.raises(ContractError, match=name), chunked_unit(n_chunks=2, where="a test unit"):
            call()
        with chunked_unit(n_chunks=1, where="a test unit"):
            call()


@torch.library.custom_op("flash_attn_guard_test::fwd", mutates_args=())
def _flash_stub(q: torch.Tensor) -> torch.Tensor:
    return q.clone()


# ---------------------------------------------------------------- multi-rank matrix
MATRIX = {
    2: [
        dict(m=2, k=3, batch=4, seq=18, docs="crossing"),
        dict(m=2, k=2, batch=2, seq=16, docs="one_doc", eval=True),
        dict(m=1, k=4, batch=2, seq=16, docs="single_tokens", partition=(7, 5, 3, 1)),
        dict(m=2, k=4, batch=2, seq=16, docs="at_boundary"),
        dict(m=3, k=3, batch=3, seq=24, docs="crossing", partition="balanced",
             model=dict(activation_checkpoint=True)),
        dict(m=2, k=3, batch=4, seq=18, targets="prompt", partition=(8, 6, 4), eval=True),
        dict(m=2, k=2, batch=4, seq=16, targets="padded", docs="crossing"),
        dict(m=2, k=3, batch=4, seq=18, targets="one_mb_masked", loss="safe"),
        dict(m=2, k=3, batch=4, seq=18, docs="crossing", model=dict(v_head_dim=12)),
    ],
    3: [
        dict(m=2, k=3, batch=2, seq=18, docs="crossing", partition=(8, 6, 4), eval=True),
        dict(m=1, k=3, batch=2, seq=18, docs="one_doc"),
        dict(m=2, k=3, batch=2, seq=12, docs="single_tokens", model=dict(activation_checkpoint=True)),
        dict(m=2, k=3, batch=2, seq=18, docs="at_boundary", targets="prompt"),
        dict(m=2, k=4, batch=2, seq=24, docs="crossing", partition="balanced", targets="padded"),
        dict(m=2, k=2, batch=4, seq=16, targets="one_mb_masked", loss="safe", docs="crossing"),
        dict(m=2, k=3, batch=2, seq=18, docs="crossing", model=dict(v_head_dim=4, attn_backend="sdpa")),
        dict(m=2, k=3, batch=2, seq=18, targets="prompt", model=dict(v_head_dim=12, activation_checkpoint=True)),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(MATRIX))
def test_matrix(world):
    results = run_ranks(exact_worker, world, MATRIX[world], timeout_s=600)
    for rank, per_rank in enumerate(results):
        for res in per_rank:
            check(res, last=rank == world - 1)


COMPILED = {
    2: dict(m=2, k=3, batch=2, seq=18, docs="crossing", targets="prompt", partition=(7, 6, 5), compile=True,
            eval=True),
    3: dict(m=2, k=3, batch=2, seq=18, docs="at_boundary", targets="padded", compile=True,
            model=dict(activation_checkpoint=True, v_head_dim=12)),
}


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(COMPILED))
def test_compiled_blocks(world):
    # torch.compile(block, fullgraph=True) on CPU (inductor), float64: documents, masked targets, eval;
    # activation checkpointing and an MLA value head size on 3 ranks.
    results = run_ranks(exact_worker, world, [COMPILED[world]], timeout_s=900)
    for rank, (res,) in enumerate(results):
        check(res, last=rank == world - 1)


@pytest.mark.slow
def test_document_masking_recipe_trains_on_two_cpu_ranks(tmp_path):
    from tests.workers.train_workers import DOCUMENTS_RECIPE, documents_worker, reference_run, tiny_config

    runs = {"seq1f1b": [], "1f1b": ["parallelism.pipeline_parallel_schedule=1F1B"]}
    records = run_ranks(documents_worker, 2, runs, str(tmp_path), timeout_s=300)
    ref, _ = reference_run(tiny_config(str(tmp_path), recipe=DOCUMENTS_RECIPE))
    unmasked, _ = reference_run(tiny_config(str(tmp_path), recipe=DOCUMENTS_RECIPE), use_document_ids=False)
    for name in runs:
        losses = records[1][name]["losses"]
        assert losses == pytest.approx(ref, rel=1e-4, abs=1e-4), name
    # The masks matter: the same packed stream without them gives another curve.
    assert max(abs(a - b) for a, b in zip(unmasked, ref)) > 1e-3


def test_packed_builtin_corpus():
    from pipelining_seq.trainer.data import DOCUMENT_SEPARATOR, builtin_documents, load_tokens, pack_documents

    assert pack_documents([b"ab", b"c"], separator=0) == b"ab\x00c\x00"
    with pytest.raises(ValueError, match="separator"):
        pack_documents([b"a\x00b"], separator=0)
    docs = builtin_documents()
    packed = load_tokens("builtin", document_masking=True)
    assert int((packed == DOCUMENT_SEPARATOR).sum()) == len(docs) > 100
    ids = document_ids_from_tokens(packed[None, :4096].long(), eos_id=DOCUMENT_SEPARATOR)
    assert int(ids.max()) >= 5  # several documents per 4096-token window
    with pytest.raises(ValueError, match="document_masking=true needs training.dataset=builtin"):
        load_tokens("some.bin", document_masking=True)


def test_document_masking_recipe_validation():
    from pipelining_seq.trainer.config import ConfigError, load_config
    from pipelining_seq.trainer.validation import validate_config
    from tests.workers.train_workers import DOCUMENTS_RECIPE

    cfg = load_config(DOCUMENTS_RECIPE)
    assert cfg.training.document_masking and not cfg.model.compile
    assert cfg.model.compile is False
    validate_config(cfg, world_size=2)
    with pytest.raises(ConfigError, match="training.document_masking=true needs training.dataset=builtin"):
        validate_config(load_config(DOCUMENTS_RECIPE, ["training.dataset=tokens.bin"]), world_size=2)
