"""Helpers of the torchtitan end-to-end tests: the package's CPU assets and a CPU launcher.

No downloads: the tokenizer and the JSONL dataset come from
:func:`pipelining_seq.integrations.torchtitan.cpu.make_assets`; every run goes through
``python -m pipelining_seq.integrations.torchtitan --cpu`` (via ``torchtitan_cpu.py``,
which adds full-precision loss recording).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelining_seq.integrations.torchtitan.cpu import asset_args, make_assets

__all__ = ["base_args", "loss_table", "make_assets", "read_losses", "run"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = "pipelining_seq.integrations.torchtitan.configs"


def base_args(tok_dir: Path, data_dir: Path, dump: Path, *, config: str = "llama3_sdpa", steps: int = 4,
              schedule: str = "1F1B", seq_len: int = 256, validate: bool = True) -> list[str]:
    """``config``: a function of the package's CPU configs, or ``module:function``."""
    module, _, name = config.rpartition(":")
    args = [
        "--module", module or CONFIGS, "--config", name, *asset_args(tok_dir, data_dir),
        "--dump_folder", str(dump),
        "--training.seq_len", str(seq_len), "--training.local_batch_size", "4",
        "--training.steps", str(steps), "--training.disable_cuda_graphs",
        "--training.mixed_precision_param", "float32",
        "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.pipeline_parallel_microbatch_size", "1",
        "--parallelism.pipeline_parallel_schedule", schedule,
        "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard",
        "--lr_scheduler.warmup_steps", "1",
        "--debug.seed", "0", "--debug.deterministic",
        "--comm.init_timeout_seconds", "300", "--comm.train_timeout_seconds", "300",
    ]
    if validate:
        args += ["--validator.enable", "--validator.freq", "2", "--validator.steps", "1"]
    return args


def run(args: list[str], *, log: Path, nproc: int = 2, timeout: float = 900) -> dict:
    """Run torchtitan's training through the package's entry point (``--cpu``) on ``nproc`` gloo ranks."""
    from pipelining_seq.tools.testing import free_port

    if log.exists():
        log.unlink()
    env = dict(os.environ, TT_LOSS_LOG=str(log), OMP_NUM_THREADS="1", LOG_RANK="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(HERE), str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(HERE / "torchtitan_cpu.py"), "--cpu", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(log.parent))
    result = {"rc": proc.returncode, "output": proc.stdout + proc.stderr, "train": {}, "validation": {}}
    if log.exists():
        result.update(read_losses(log))
    return result


def read_losses(path: Path) -> dict:
    out: dict = {"train": {}, "validation": {}}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        # Ranks without the last stage log -1 (summed over data-parallel ranks: -2, ...);
        # a cross-entropy loss is never negative.
        if rec["loss"] >= 0:
            out[rec["kind"]][rec["step"]] = rec["loss"]
    return out


def loss_table(root: Path, base: str, others: list[str]) -> str:
    """Markdown table of per-step losses of the runs in ``root`` against ``base``."""
    ref = read_losses(root / f"{base}.jsonl")
    cols = [(n, read_losses(root / f"{n}.jsonl")) for n in others if (root / f"{n}.jsonl").exists()]
    lines = ["| step | " + " | ".join([base, *(n for n, _ in cols)]) + " |", "|---" * (1 + 1 + len(cols)) + "|"]
    for kind in ("train", "validation"):
        for s in sorted(ref[kind]):
            row = [f"{kind} {s}", f"{ref[kind][s]:.7f}"]
            for _, c in cols:
                v = c[kind].get(s)
                row.append("" if v is None else f"{v:.7f} ({v - ref[kind][s]:+.1e})")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(d: Path) -> str:
    """Every loss table of one ``-m torchtitan`` session (its pytest tmp dir ``.../titan0``)."""
    tables = [
        ("llama3, PP=2, 2 ranks: 1F1B vs Seq1F1B", "llama3_1f1b",
         ["llama3_k2_uniform", "llama3_k4_uniform", "llama3_k2_balanced", "llama3_k4_balanced", "llama3_section",
          "llama3_k2_resume", "llama3_k2_compiled", "llama3_zb_k2"]),
        ("llama3, PP=2, 2 stages per rank: Interleaved1F1B vs InterleavedSeq1F1B", "llama3_interleaved_1f1b",
         ["llama3_interleaved_k2"]),
        ("qwen3, PP=2", "qwen3_1f1b", ["qwen3_k2"]),
        ("deepseek_v3, PP=2", "deepseek_v3_1f1b", ["deepseek_v3_k2"]),
        ("llama3 block-causal documents, PP=2", "llama3_doc_1f1b", ["llama3_doc_k4"]),
        ("llama3, PP=2 x FSDP (dp_shard=2), 4 ranks", "llama3_fsdp_1f1b", ["llama3_fsdp_Seq1F1B_k2"]),
        ("llama3, PP=2 x TP=2 + SP, 4 ranks", "llama3_tp_sp_1f1b",
         ["llama3_tp_sp_Seq1F1B_k2", "llama3_tp_sp_Seq1F1BZeroBubble_k2"]),
        ("qwen3, PP=2 x TP=2 + SP, 4 ranks", "qwen3_tp_sp_1f1b", ["qwen3_tp_sp_Seq1F1B_k2"]),
    ]
    out = []
    for title, base, others in tables:
        if (d / f"{base}.jsonl").exists():
            out.append(f"{title}\n\n{loss_table(d, base, others)}")
    return "\n\n".join(out)


if __name__ == "__main__":  # python tests/titan_run.py <pytest tmp dir>/titan0
    print(report(Path(sys.argv[1])))
