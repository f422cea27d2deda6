"""torchtitan's own Trainer with the Seq1F1B schedules, end to end on gloo CPU ranks, fp32.

Every run goes through ``python -m pipelining_seq.integrations.torchtitan --cpu`` (launched
by ``tests/workers/torchtitan_cpu.py``, which only adds full-precision loss recording). Per-step
training and validation losses of each Seq1F1B schedule must equal torchtitan's own
schedule to 1e-5: ``Seq1F1B`` against ``1F1B``, ``InterleavedSeq1F1B`` against
``Interleaved1F1B`` (``Seq1F1BZeroBubble`` is refused at start-up under torchtitan's
FSDP2). PP=2 on 2 ranks (seq 256, 4 steps), and PP=2 x FSDP / PP=2 x TP=2 with sequence
parallelism on 4 ranks (seq 64, 2 steps).
Baselines use torchtitan's ``ScaledDotProductAttention`` (flex attention has no backward on
CPU); Seq1F1B converts it to the package's attention. Needs torchtitan (``.venv-tt``):
``.venv-tt/bin/python -m pytest -m torchtitan``.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="torchtitan is not installed in this interpreter")

from pipelining_seq.integrations.torchtitan.attention import SUPPORTS_DOCUMENT_IDS  # noqa: E402
from tests.workers.titan_run import base_args, make_assets, run  # noqa: E402

pytestmark = [pytest.mark.torchtitan, pytest.mark.slow]

TOL = 1e-5
SEQ = "Seq1F1B"


class Runs:
    """Each named run once per session (a run is ~20-60 s on 2 CPU cores)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tok, self.data = make_assets(root / "assets")
        self._done: dict[str, dict] = {}

    def get(self, name: str, *extra: str, config: str = "llama3_sdpa", schedule: str = "1F1B",
            steps: int = 4, dump: Path | None = None, nproc: int = 2) -> dict:
        if name not in self._done:
            dump = dump or self.root / name
            if nproc == 4:  # 4 ranks on 2 shared cores: short sequences, 2 steps, no validation
                args = base_args(self.tok, self.data, dump, config=config, schedule=schedule, steps=2,
                                 seq_len=64, validate=False)
            else:
                args = base_args(self.tok, self.data, dump, config=config, schedule=schedule, steps=steps)
            result = run([*args, *extra], log=self.root / f"{name}.jsonl", nproc=nproc)
            result["dump"] = dump
            self._done[name] = result
        return self._done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("titan"))


def ok(result: dict) -> dict:
    assert result["rc"] == 0, result["output"][-6000:]
    return result


def assert_same_losses(seq: dict, ref: dict, *, steps=(1, 2, 3, 4)) -> None:
    for kind in ("train", "validation"):
        want = {s: v for s, v in ref[kind].items() if kind == "validation" or s in steps}
        got = {s: v for s, v in seq[kind].items() if kind == "validation" or s in steps}
        assert set(got) == set(want) and (want or kind == "validation"), (kind, got, want)
        for s in want:
            assert abs(got[s] - want[s]) <= TOL, (kind, s, got[s], want[s])


def baseline(runs: Runs) -> dict:
    return ok(runs.get("llama3_1f1b"))


@pytest.mark.parametrize("k,partition", [(2, "uniform"), (4, "uniform"), (2, "balanced"), (4, "balanced")])
def test_llama3_seq1f1b_equals_1f1b(runs, k, partition):
    extra = ["--seq1f1b.n_seq_chunks", str(k), "--seq1f1b.partition", partition]
    if (k, partition) == (2, "uniform"):  # this run also saves the step-2 checkpoint
        extra += ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.folder", "checkpoint"]
    if (k, partition) == (4, "uniform"):  # and this one profiles and writes TensorBoard events
        extra += ["--profiler.enable_profiling", "--profiler.profile_freq", "2", "--profiler.profiler_warmup", "0",
                  "--metrics.enable_tensorboard"]
    seq = ok(runs.get(f"llama3_k{k}_{partition}", *extra, schedule=SEQ))
    if (k, partition) == (4, "uniform"):
        traces = list(seq["dump"].rglob("rank1_trace.json*"))
        # The schedule's record_function names: 16 units (4 micro-batches x 4 chunks) on stage 1.
        text = "".join((gzip.open if p.suffix == ".gz" else open)(p, "rt").read() for p in traces)
        assert traces and '"PP:1F15"' in text and '"PP:1B0"' in text, traces
        assert any(seq["dump"].rglob("events.out.tfevents*"))
    out = seq["output"]
    # ScheduleSeq1F1B itself refuses a stage that is not a SequencePipelineStage when k > 1.
    assert f"ScheduleSeq1F1B_k{k}" in out, "the Seq1F1B schedule was not used"
    if partition == "balanced":
        assert "partition balanced -> chunk lengths" in out
    assert_same_losses(seq, baseline(runs))


def test_resume_from_step_2_reproduces_steps_3_and_4(runs):
    first = ok(runs.get("llama3_k2_uniform", "--seq1f1b.n_seq_chunks", "2", "--seq1f1b.partition", "uniform",
                        "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.folder", "checkpoint",
                        schedule=SEQ))
    saved = first["dump"] / "checkpoint" / "step-2"
    assert saved.is_dir(), sorted(p.name for p in (first["dump"] / "checkpoint").iterdir())
    dump = runs.root / "resume"
    shutil.copytree(saved, dump / "checkpoint" / "step-2")
    resumed = ok(runs.get("llama3_k2_resume", "--seq1f1b.n_seq_chunks", "2", "--checkpoint.enable",
                          "--checkpoint.interval", "2", "--checkpoint.folder", "checkpoint", schedule=SEQ, dump=dump))
    assert sorted(resumed["train"]) == [3, 4], resumed["train"]
    for s in (3, 4):
        assert abs(resumed["train"][s] - first["train"][s]) <= TOL
        assert abs(resumed["train"][s] - baseline(runs)["train"][s]) <= TOL


def test_config_file_section(runs):
    """A config function returning Seq1F1BTrainer.Config with a seq1f1b section (k=4, balanced)."""
    seq = ok(runs.get("llama3_section", config="llama3_seq1f1b_section", schedule=SEQ))
    assert "ScheduleSeq1F1B_k4" in seq["output"] and "partition balanced" in seq["output"]
    assert_same_losses(seq, baseline(runs))


@pytest.mark.parametrize("model", ["qwen3", "deepseek_v3"])
def test_other_models(runs, model):
    ref = ok(runs.get(f"{model}_1f1b", config=f"{model}_sdpa"))
    seq = ok(runs.get(f"{model}_k2", "--seq1f1b.n_seq_chunks", "2", "--seq1f1b.partition", "balanced",
                      config=f"{model}_sdpa", schedule=SEQ))
    assert_same_losses(seq, ref)


@pytest.mark.skipif(not SUPPORTS_DOCUMENT_IDS, reason="ChunkedCausalAttention has no document_ids yet")
def test_document_masking_seq1f1b_equals_1f1b(runs):
    """torchtitan's flex model (block-causal per document); both runs use the package's attention."""
    ref = ok(runs.get("llama3_doc_1f1b", "--seq1f1b.attention", "always", config="torchtitan.models.llama3.config_registry:llama3_debugmodel"))
    seq = ok(runs.get("llama3_doc_k4", "--seq1f1b.n_seq_chunks", "4", "--seq1f1b.partition", "balanced",
                      config="torchtitan.models.llama3.config_registry:llama3_debugmodel", schedule=SEQ))
    assert_same_losses(seq, ref)
    # The masks are on: the same weights and data give other losses than plain causal attention.
    assert abs(ref["train"][1] - baseline(runs)["train"][1]) > 1e-4


def test_compile_enable(runs):
    """--compile.enable (every block compiled with fullgraph=True): equal to the uncompiled 1F1B run, or,
    with a ChunkedCausalAttention that cannot be compiled, refused at start-up naming the knob."""
    result = runs.get("llama3_k2_compiled", "--seq1f1b.n_seq_chunks", "2", "--compile.enable", schedule=SEQ)
    if result["rc"] != 0:
        assert "--compile.enable with Seq1F1B" in result["output"] and not result["train"], result["output"][-4000:]
        return
    assert "Compiling each TransformerBlock with torch.compile" in result["output"]
    assert_same_losses(result, baseline(runs))


def test_unconverted_attention_is_refused_at_start(runs):
    result = runs.get("llama3_never", "--seq1f1b.attention", "never", schedule=SEQ, steps=1)
    assert result["rc"] != 0 and not result["train"]
    assert "layers.0.attention.inner_attention" in result["output"] or "no chunk-aware attention" in result["output"]


@pytest.mark.skipif(SUPPORTS_DOCUMENT_IDS, reason="document masking is supported")
def test_flex_document_masking_refused_without_document_ids(runs):
    result = runs.get("llama3_flex_refused", config="torchtitan.models.llama3.config_registry:llama3_debugmodel", schedule=SEQ, steps=1)
    assert result["rc"] != 0 and not result["train"]
    assert "layers.0.attention.inner_attention is FlexAttention.Config" in result["output"]


INTERLEAVED = ("--parallelism.pipeline_parallel_layers_per_stage", "2")  # (6 + 1 + 1) / 2 = 4 stages, 2 per rank
def test_interleaved_by_name_equals_interleaved_1f1b(runs):
    ref = ok(runs.get("llama3_interleaved_1f1b", *INTERLEAVED, schedule="Interleaved1F1B"))
    seq = ok(runs.get("llama3_interleaved_k2", *INTERLEAVED, "--seq1f1b.n_seq_chunks", "2",
                      schedule="InterleavedSeq1F1B"))
    assert "ScheduleInterleavedSeq1F1B_k2, 2 stage(s) on this rank" in seq["output"]
    assert_same_losses(seq, ref)


FSDP = ("--parallelism.data_parallel_shard_degree", "2")
TP_SP = ("--parallelism.tensor_parallel_degree", "2")  # torchtitan turns sequence parallelism on with TP


@pytest.mark.parametrize("model,composition,schedule", [
    ("llama3", "fsdp", "Seq1F1B"),
    ("llama3", "tp_sp", "Seq1F1B"),
    ("qwen3", "tp_sp", "Seq1F1B"),
])
def test_four_ranks_equal_1f1b(runs, model, composition, schedule):
    """PP=2 x FSDP (dp_shard=2) or PP=2 x TP=2 with sequence parallelism, 4 gloo ranks, k=2."""
    extra = FSDP if composition == "fsdp" else TP_SP
    ref = ok(runs.get(f"{model}_{composition}_1f1b", *extra, config=f"{model}_sdpa", nproc=4))
    seq = ok(runs.get(f"{model}_{composition}_{schedule}_k2", *extra, "--seq1f1b.n_seq_chunks", "2",
                      config=f"{model}_sdpa", schedule=schedule, nproc=4))
    assert f"Schedule{schedule}_k2" in seq["output"]
    if composition == "tp_sp":  # receive buffers sized for the sequence shard
        assert "SeqShardedPipelineStage_2" in seq["output"], "sequence parallelism was not on"
    assert_same_losses(seq, ref, steps=(1, 2))
