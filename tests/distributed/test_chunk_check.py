"""The chunk-exactness check: check_chunking in one process, the in-schedule check of the
three Seq1F1B schedules (2 gloo ranks, float64), the step keyword inputs in the first-step
agreement, torch's tracer front end refused, and the shared-attention message."""

import inspect

import pytest
import torch
from torch import nn

from pipelining_seq import (
    ChunkedCausalAttention,
    ContractError,
    ScheduleSeq1F1B,
    SequencePipelineStage,
    check_chunking,
    chunk_positions,
)
from pipelining_seq.chunk_check import relative_tolerance
from pipelining_seq.models import GPT, GPTConfig
from pipelining_seq.tools.testing import run_ranks
from tests.workers.chunk_check_worker import check_worker
from tests.workers.chunk_models import VOCAB, TinyLM, ce
from tests.workers.parity_worker import make_model


def tokens(b=2, s=32, seed=1):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_signature_is_the_documented_one():
    params = inspect.signature(check_chunking).parameters
    assert list(params) == ["module", "args", "n_seq_chunks", "seq_partition", "seq_dim", "kwargs"]
    assert params["n_seq_chunks"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["seq_partition"].default == "uniform" and params["seq_dim"].default == 1


# ------------------------------------------------------------- no false alarms
GPT_CASES = [  # (dtype, model): every dtype on the GQA/SwiGLU model, the variants in one dtype each
    (torch.float64, dict()),
    (torch.float32, dict()),
    (torch.bfloat16, dict()),
    (torch.bfloat16, dict(v_head_dim=12)),  # MLA-style value heads
    (torch.float32, dict(activation_checkpoint=True)),
    (torch.float32, dict(mlp="gelu", n_kv_heads=None, attn_backend="sdpa")),
]


@pytest.mark.parametrize("dtype,over", GPT_CASES,
                         ids=lambda c: str(c) if isinstance(c, torch.dtype) else "-".join(f"{k}={v}" for k, v in c.items()))
def test_reference_gpt_passes(dtype, over):
    model = make_model(n_layers=2, **over).to(dtype)
    x = tokens(2, 24)
    ids = torch.zeros_like(x)
    ids[0, 5:] = 1
    ids[1, 13:] = 2  # documents crossing chunk boundaries
    for kwargs, partition in (({}, "uniform"), ({"document_ids": ids}, [10, 8, 6])):
        report = check_chunking(model, x, n_seq_chunks=3, seq_partition=partition, **kwargs)
        assert report.ok and report.output is not None
        rtol, _ = relative_tolerance(dtype)
        assert report.output.rtol == rtol
        # Every block's submodules were compared (hooks reach them), all within tolerance.
        names = {d.name for d in report.modules}
        assert {"layers.0.attention.attn", "layers.1.feed_forward", "output"} <= names
        assert all(d.ok for d in report.modules)
        assert report.lengths == ([8, 8, 8] if partition == "uniform" else [10, 8, 6])


def test_a_later_stage_and_bf16_autocast_pass():
    from pipelining_seq.models import split_stage

    part = split_stage(make_model().float(), 1, 2)
    h = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0))
    assert check_chunking(part, h, n_seq_chunks=4).ok
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = check_chunking(part, h, n_seq_chunks=4)
    assert report.ok and report.output.precision == "bfloat16"


@pytest.mark.slow
def test_compiled_blocks_pass_and_are_not_looked_into():
    model = make_model(n_layers=2)
    model.compile_blocks()
    report = check_chunking(model, tokens(2, 16), n_seq_chunks=2)
    assert report.ok
    assert any("layers.0 (compiled)" in s for s in report.not_compared)
    assert not any(d.name.startswith("layers.") for d in report.modules)


def test_report_reads_well_and_one_chunk_is_nothing_to_check():
    report = check_chunking(TinyLM().double(), tokens(), n_seq_chunks=4)
    text = str(report)
    assert "chunk-exactness of TinyLM: ok, 4 chunks [8, 8, 8, 8]" in text
    assert "blocks.0.attention.attn: max diff" in text and "float64" in text
    one = check_chunking(TinyLM().double(), tokens(), n_seq_chunks=1)
    assert one.ok and one.output is None and one.modules == []
    with pytest.raises(ValueError, match="no input tensor has a dimension seq_dim=2"):
        check_chunking(TinyLM(), tokens(), n_seq_chunks=2, seq_dim=2)
    with pytest.raises(ValueError, match="n_seq_chunks=0"):
        check_chunking(TinyLM(), tokens(), n_seq_chunks=0)


# ------------------------------------------------------------ the mistakes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_eager_attention_is_caught_and_named(dtype):
    with pytest.raises(ContractError) as err:
        check_chunking(TinyLM(attn="eager").to(dtype), tokens(), n_seq_chunks=4)
    msg = str(err.value)
    assert "first differing submodule: blocks.0.attention.attn (max" in msg
    assert "ChunkedCausalAttention" in msg and "chunk_positions" in msg and "dropout" in msg


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_positions_from_arange_are_caught_at_the_attention_inputs(dtype):
    # At initialisation attention is nearly uniform, so positions matter little: the
    # smallest of the mistakes, still ~10x the float32 tolerance.
    with pytest.raises(ContractError) as err:
        check_chunking(TinyLM(positions="arange").to(dtype), tokens(), n_seq_chunks=4)
    msg = str(err.value)
    assert "first differing submodule: blocks.0.attention.attn (inputs q, k, v)" in msg
    assert "arange of the chunk instead of pipelining_seq.chunk_positions" in msg
    # A later stage (hidden states in) is caught the same way.
    part = TinyLM(positions="arange", n_layers=2, part=(1, 2)).to(dtype)
    with pytest.raises(ContractError, match=r"blocks.0.attention.attn \(inputs q, k, v\)"):
        check_chunking(part, torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype),
                       n_seq_chunks=4)


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = TinyLM()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.lm(x))


def test_dropout_in_training_mode_is_caught():
    with pytest.raises(ContractError, match="first differing submodule: drop .*dropout or other randomness"):
        check_chunking(WithDropout().double().train(), tokens(), n_seq_chunks=2)
    assert check_chunking(WithDropout().double().eval(), tokens(), n_seq_chunks=2).ok


class Counting(TinyLM):
    """Counts the tokens it sees in a buffer, as MoE load balancing or BatchNorm do."""

    def __init__(self):
        super().__init__()
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64))

    def forward(self, h, document_ids=None):
        self.tokens_seen += h.shape[0] * h.shape[1]
        return super().forward(h, document_ids) + 0 * torch.rand(())


@pytest.mark.usefixtures("world_of_one")
def test_the_extra_forwards_leave_buffers_and_random_state_alone():
    model = Counting().double()
    state = torch.random.get_rng_state()
    check_chunking(model, tokens(), n_seq_chunks=4)
    assert model.tokens_seen.item() == 0 and torch.equal(torch.random.get_rng_state(), state)
    x, y = tokens(4, 16), tokens(4, 16, seed=2)
    seen = []
    for verify in (True, False):
        model = Counting().double()
        sched = ScheduleSeq1F1B(SequencePipelineStage(model, 0, 1, torch.device("cpu")), 2, ce, n_seq_chunks=4,
                                verify_chunking=verify)
        torch.manual_seed(5)
        sched.step(x, target=y)
        seen.append((model.tokens_seen.item(), torch.rand(()).item()))
    assert seen[0] == seen[1]


def test_tolerances_by_precision():
    assert relative_tolerance(torch.float64)[0] < relative_tolerance(torch.float32)[0]
    assert relative_tolerance(torch.float32, torch.bfloat16) == relative_tolerance(torch.bfloat16)
    assert relative_tolerance(torch.float32, device_type="cpu")[1] == "float32"


# ------------------------------------------------------------ one-rank schedules
@pytest.mark.usefixtures("world_of_one")
def test_schedule_refuses_before_returning_and_opt_out():
    x, y = tokens(4, 16), tokens(4, 16, seed=2)
    model = TinyLM(attn="eager").double()
    sched = ScheduleSeq1F1B(SequencePipelineStage(model, 0, 1, torch.device("cpu")), 2, ce, n_seq_chunks=4)
    losses: list = []
    with pytest.raises(ContractError, match=r"stage 0 \(first training step\).*blocks.0.attention.attn"):
        sched.step(x, target=y, losses=losses)
    # step() raised: a trainer never reaches its optimizer step.
    # Opted out: the same model runs (wrong, and unchecked).
    model2 = TinyLM(attn="eager").double()
    sched = ScheduleSeq1F1B(SequencePipelineStage(model2, 0, 1, torch.device("cpu")), 2, ce, n_seq_chunks=4,
                            verify_chunking=False)
    sched.step(x, target=y, losses=losses)
    assert len(losses) == 2
    with pytest.raises(TypeError, match="verify_chunking='yes' must be True or False"):
        ScheduleSeq1F1B(SequencePipelineStage(TinyLM(), 0, 1, torch.device("cpu")), 2, ce, n_seq_chunks=4,
                        verify_chunking="yes")


@pytest.mark.usefixtures("world_of_one")
def test_first_eval_is_checked_and_later_steps_cost_nothing():
    x, y = tokens(4, 16), tokens(4, 16, seed=2)
    calls = [0]

    def count(*_):
        calls[0] += 1

    def calls_per_run(verify):
        model = TinyLM().double()
        model.register_forward_pre_hook(count)
        sched = ScheduleSeq1F1B(SequencePipelineStage(model, 0, 1, torch.device("cpu")), 2, ce, n_seq_chunks=4,
                                verify_chunking=verify)
        seen = []
        for run in (sched.step, sched.step, sched.eval, sched.eval):
            calls[0] = 0
            sched.chunk_check_results = None
            run(x, target=y)
            seen.append((calls[0], sched.chunk_check_results is not None))
        return seen

    on, off = calls_per_run(True), calls_per_run(False)
    # One extra whole-sequence forward on the first step and the first eval, none later.
    assert [a - b for (a, _), (b, _) in zip(on, off)] == [1, 0, 1, 0]
    assert [checked for _, checked in on] == [True, False, True, False]
    assert not any(checked for _, checked in off)
    # A model that breaks the contract is refused on its first eval too.
    bad = ScheduleSeq1F1B(SequencePipelineStage(TinyLM(attn="eager").double(), 0, 1, torch.device("cpu")), 2, ce,
                          n_seq_chunks=4)
    with pytest.raises(ContractError, match=r"stage 0 \(first eval\)"):
        bad.eval(x, target=y)
    # k = 1 is plain 1F1B: nothing to check.
    one = ScheduleSeq1F1B(SequencePipelineStage(TinyLM(attn="eager").double(), 0, 1, torch.device("cpu")), 2, ce,
                          n_seq_chunks=1)
    one.step(x, target=y)
    assert getattr(one, "chunk_check_results", None) is None


@pytest.mark.usefixtures("world_of_one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_gpt_passes_in_the_schedule(dtype):
    # Documents, activation checkpointing and uneven chunks, as the shipped recipes run.
    model = make_model(n_layers=2, activation_checkpoint=True).to(dtype)
    x, y = tokens(4, 24), tokens(4, 24, seed=2)
    ids = torch.zeros_like(x)
    ids[:, 9:] = 1
    sched = ScheduleSeq1F1B(SequencePipelineStage(model, 0, 1, torch.device("cpu")), 2, ce, n_seq_chunks=3,
                            seq_partition=[10, 8, 6])
    sched.step(x, target=y, document_ids=ids)
    (row,) = sched.chunk_check_results
    assert row["ok"] and row["max_diff"] <= row["tol"]


class SharedAttention(nn.Module):
    """Two layers calling ONE ChunkedCausalAttention instance."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.attn = ChunkedCausalAttention()
        self.out = nn.Linear(16, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        for qkv in self.qkv:
            q, k, v = qkv(h).view(h.shape[0], h.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            h = h + self.attn(q, k, v).transpose(1, 2).reshape(h.shape)
        return self.out(h + 0 * chunk_positions(h.shape[1], h.device)[None, :, None])


@pytest.mark.usefixtures("world_of_one")
def test_shared_attention_says_one_instance_per_layer():
    sched = ScheduleSeq1F1B(SequencePipelineStage(SharedAttention(), 0, 1, torch.device("cpu")), 2, ce,
                            n_seq_chunks=2)
    with pytest.raises(ContractError) as err:
        sched.step(tokens(4, 16), target=tokens(4, 16, seed=2))
    assert "one instance per attention layer" in str(err.value)
    assert "compile" not in str(err.value) and "flex" not in str(err.value)


@pytest.mark.usefixtures("world_of_one")
def test_tracer_front_end_is_refused_with_what_to_do():
    from torch.distributed.pipelining import SplitPoint, pipeline

    model = GPT(GPTConfig(vocab_size=VOCAB, n_layers=2, dim=16, n_heads=2)).double()
    pipe = pipeline(model, mb_args=(tokens(1, 16),), split_spec={"layers.1": SplitPoint.BEGINNING})
    traced = pipe.build_stage(0, torch.device("cpu"))
    for stage in (traced, SequencePipelineStage(pipe.get_stage_module(0), 0, 2, torch.device("cpu"))):
        with pytest.raises(TypeError) as err:
            ScheduleSeq1F1B(stage, 2, ce, n_seq_chunks=2)
        msg = str(err.value)
        assert "torch's tracer front end" in msg and "SequencePipelineStage(module" in msg
        assert "check_chunking" in msg and "n_seq_chunks=1" in msg
    # With one chunk per micro-batch the traced stage is plain 1F1B: accepted.
    ScheduleSeq1F1B(traced, 2, ce, n_seq_chunks=1)


# ---------------------------------------------------------- 2 ranks, float64
MISTAKES = [
    dict(schedule="1F1B", attn="eager"),
    dict(schedule="ZB", positions="arange"),
    dict(schedule="I", attn="eager"),
]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", MISTAKES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_rank_raises_the_same_error(cfg):
    results = run_ranks(check_worker, 2, cfg)
    errors = {r["error"] for r in results}
    assert len(errors) == 1 and None not in errors, errors
    msg = errors.pop()
    assert "stage 0 (first training step)" in msg and "first differing submodule: blocks.0.attention.attn" in msg
    assert all(r["kind"] == "ContractError" and r["leftover"] == 0 for r in results)
    stages = {row["stage"]: row["ok"] for row in results[0]["results"]}
    assert not any(stages.values()) and len(stages) == (4 if cfg["schedule"] == "I" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1F1B", "I", "ZB"])
def test_contract_kept_passes_once_then_costs_nothing(schedule):
    results = run_ranks(check_worker, 2, dict(schedule=schedule, calls=["step", "step", "eval", "eval"], docs="all"))
    per_rank = 2 if schedule == "I" else 1  # stages per rank: one whole-sequence forward each
    for r in results:
        assert r["error"] is None
        assert r["whole_calls"] == [per_rank, 0, per_rank, 0]
        assert all(row["ok"] and row["max_diff"] <= row["tol"] for row in r["results"])


@pytest.mark.slow
def test_document_ids_on_some_ranks_only_is_refused():
    # It used to train silently on wrong losses (the stage without ids attends across
    # documents); now the first-step agreement names both ranks before any unit runs.
    results = run_ranks(check_worker, 2, dict(schedule="1F1B", docs="first"))
    for r in results:
        assert r["kind"] == "AgreementError" and r["calls"] == []
        assert 'step_keyword_inputs: ["document_ids"] on rank(s) [0]; [] on rank(s) [1]' in r["error"]
        assert "to step() on every stage" in r["error"]
