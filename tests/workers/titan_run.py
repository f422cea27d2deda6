"""Helpers of the torchtitan end-to-end tests: local assets and a 2-rank CPU launcher.

No downloads: the tokenizer (a small BPE from the ``tokenizers`` package) and the JSONL
dataset are made from the package's own corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORPUS = REPO / "pipelining_seq" / "corpus" / "python_reference.txt"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def make_assets(root: Path, *, n_docs: int = 400) -> tuple[Path, Path]:
    """(tokenizer folder, dataset folder) under ``root``; made once."""
    tok_dir, data_dir = root / "tokenizer", root / "data"
    if (tok_dir / "tokenizer.json").exists() and (data_dir / "data.json").exists():
        return tok_dir, data_dir
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    paragraphs = [p.strip() for p in CORPUS.read_text().split("\n\n") if len(p.strip()) > 40]
    docs = paragraphs[:n_docs]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", BOS, EOS], show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "data.json", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return tok_dir, data_dir


def base_args(tok_dir: Path, data_dir: Path, dump: Path, *, config: str = "llama3_sdpa", steps: int = 4,
              schedule: str = "1F1B", seq_len: int = 256) -> list[str]:
    return [
        "--module", "titan_configs", "--config", config,
        "--hf_assets_path", str(tok_dir),
        "--dataloader.dataset", "c4_test", "--dataloader.dataset_path", str(data_dir),
        "--dump_folder", str(dump),
        "--training.seq_len", str(seq_len), "--training.local_batch_size", "4",
        "--training.steps", str(steps), "--training.disable_cuda_graphs",
        "--training.mixed_precision_param", "float32",
        "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.pipeline_parallel_microbatch_size", "1",
        "--parallelism.pipeline_parallel_schedule", schedule,
        "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard",
        "--validator.enable", "--validator.freq", "2", "--validator.steps", "1",
        "--validator.dataloader.dataset", "c4_test", "--validator.dataloader.dataset_path", str(data_dir),
        "--lr_scheduler.warmup_steps", "1",
        "--debug.seed", "0", "--debug.deterministic",
        "--comm.init_timeout_seconds", "300", "--comm.train_timeout_seconds", "300",
    ]


def run(args: list[str], *, log: Path, timeout: float = 900) -> dict:
    """Run torchtitan's training through the package's entry point on 2 gloo ranks."""
    from pipelining_seq.testing import free_port

    if log.exists():
        log.unlink()
    env = dict(os.environ, TT_LOSS_LOG=str(log), OMP_NUM_THREADS="1", LOG_RANK="0,1",
               PYTHONPATH=os.pathsep.join(p for p in (str(HERE), str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(HERE / "torchtitan_cpu.py"),
           "-m", "pipelining_seq.integrations.torchtitan", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(log.parent))
    result = {"rc": proc.returncode, "output": proc.stdout + proc.stderr, "train": {}, "validation": {}}
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec["loss"] != -1.0:  # ranks without the last stage log -1
                result[rec["kind"]][rec["step"]] = rec["loss"]
    return result


def read_losses(path: Path) -> dict:
    out: dict = {"train": {}, "validation": {}}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["loss"] != -1.0:
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


if __name__ == "__main__":  # python -m tests.workers.titan_run <pytest tmp dir>/titan0
    d = Path(sys.argv[1])
    print(loss_table(d, "llama3_1f1b", ["llama3_k2_uniform", "llama3_k4_uniform", "llama3_k2_balanced",
                                        "llama3_k4_balanced", "llama3_section", "llama3_k2_resume"]))
    for m in ("qwen3", "deepseek_v3", "llama3_doc"):
        if (d / f"{m}_1f1b.jsonl").exists():
            print(f"\n{m}\n\n" + loss_table(d, f"{m}_1f1b", [f"{m}_k2", f"{m}_k4"]))
