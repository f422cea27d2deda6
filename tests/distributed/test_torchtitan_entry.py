"""The torchtitan entry point as a user meets it: --help, --cpu-assets, and start-up refusals.

Single processes, no process group: every refusal here must come before one exists,
printed once (rank 0) on one line, with exit status 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torchtitan", reason="torchtitan is not installed in this interpreter")

pytestmark = pytest.mark.torchtitan

ENTRY = [sys.executable, "-m", "pipelining_seq.integrations.torchtitan"]
CONFIG = ["--module", "pipelining_seq.integrations.torchtitan.configs", "--config", "llama3_sdpa",
          "--parallelism.pipeline_parallel_degree", "2", "--training.seq_len", "256", "--training.disable_cuda_graphs"]


def entry(*args: str, rank: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    if rank is not None:
        env["RANK"] = rank
    return subprocess.run([*ENTRY, *args], capture_output=True, text=True, timeout=300, env=env)


def test_help_without_module():
    out = entry("--help")
    assert out.returncode == 0, out.stderr
    for text in ("--cpu", "--cpu-assets", "--seq1f1b.n_seq_chunks", "InterleavedSeq1F1B", "Seq1F1BZeroBubble"):
        assert text in out.stdout


def test_cpu_assets(tmp_path):
    out = entry("--cpu-assets", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file() and (tmp_path / "data" / "data.json").is_file()
    assert f"--hf_assets_path {tmp_path / 'tokenizer'}" in out.stdout
    assert f"--dataloader.dataset_path {tmp_path / 'data'}" in out.stdout


def refusal_lines(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return [line for line in out.stderr.splitlines() if "seq1f1b: error:" in line]


@pytest.mark.parametrize("args,text", [
    (["--parallelism.pipeline_parallel_schedule", "Seq1F1BFast"], "Seq1F1B, InterleavedSeq1F1B, Seq1F1BZeroBubble"),
    (["--parallelism.pipeline_parallel_schedule", "Seq1F1B", "--seq1f1b.n_seq_chunks", "3"],
     "--seq1f1b.n_seq_chunks (3)"),
    (["--parallelism.pipeline_parallel_schedule", "Seq1F1B", "--parallelism.pipeline_parallel_layers_per_stage", "1"],
     "--parallelism.pipeline_parallel_layers_per_stage 1"),
    (["--parallelism.pipeline_parallel_schedule", "seq1f1bzerobubble"], "FSDP2 with a split (input, then weight)"),
])
def test_refused_once_on_one_line(args, text):
    lines = refusal_lines(entry("--cpu", *CONFIG, *args))
    assert len(lines) == 1 and text in lines[0], lines
    assert refusal_lines(entry("--cpu", *CONFIG, *args, rank="1")) == []  # other ranks exit quietly
