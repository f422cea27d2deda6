"""Helpers for the training tests: tiny overrides, a spawned-rank worker, and a
single-process reference of the training loop (importable by spawned processes)."""

from __future__ import annotations

import os

import torch

from pipelining_seq.models import GPT, cross_entropy_loss, document_ids_from_tokens, init_weights
from pipelining_seq.trainer.config import JobConfig, load_config
from pipelining_seq.trainer.data import DOCUMENT_SEPARATOR, TokenBatches, load_tokens
from pipelining_seq.trainer.layout import n_microbatches
from pipelining_seq.trainer.optim import build_optimizer, clip_grad_norm_

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RECIPE = os.path.join(ROOT, "recipes", "gpt_tiny_cpu.yaml")

# The default recipe, shrunk so a step takes milliseconds.
TINY = [
    "training.seq_len=64", "model.dim=64", "training.steps=5", "training.num_threads=1",
    "metrics.enable_tensorboard=false", "checkpoint.enable=false", "metrics.log_freq=100",
]


DOCUMENTS_RECIPE = os.path.join(ROOT, "recipes", "gpt_tiny_cpu_documents.yaml")


def tiny_config(dump_folder: str, *extra: str, recipe: str = DEFAULT_RECIPE) -> JobConfig:
    return load_config(recipe, [*TINY, f"job.dump_folder={dump_folder}", *extra])


def documents_worker(rank: int, world: int, runs: dict[str, list[str]], dump_folder: str) -> dict[str, dict]:
    """Train the packed-documents recipe with each override set; return each record."""
    from pipelining_seq.trainer.train import train

    return {name: train(tiny_config(dump_folder, *o, recipe=DOCUMENTS_RECIPE)) for name, o in runs.items()}


def schedules_worker(rank: int, world: int, runs: dict[str, list[str]], dump_folder: str) -> dict[str, dict]:
    """Train each named override set on this process group; return each record."""
    from pipelining_seq.trainer.train import train

    return {name: train(tiny_config(dump_folder, *overrides)) for name, overrides in runs.items()}


def reference_run(cfg: JobConfig, *, use_document_ids: bool = True) -> tuple[list[float], list[float]]:
    """The training loop on one process, whole model, no pipeline: per-step mean loss
    over the micro-batches and gradient norm."""
    torch.manual_seed(0)
    gcfg = cfg.model
    with torch.device("meta"):
        model = GPT(gcfg)
    model.to_empty(device="cpu")
    init_weights(model, seed=cfg.training.seed, n_layers=gcfg.n_layers)
    opt, sched = build_optimizer(cfg, model)
    t = cfg.training
    batches = TokenBatches(
        load_tokens(t.dataset, dtype=t.dataset_dtype, document_masking=t.document_masking), seq_len=t.seq_len,
        global_batch_size=t.local_batch_size,
        seed=t.seed,
    )
    m = n_microbatches(cfg)
    losses, norms = [], []
    for step in range(1, t.steps + 1):
        x, y = batches.batch(step)
        ids = document_ids_from_tokens(x, eos_id=DOCUMENT_SEPARATOR) if t.document_masking and use_document_ids else None
        step_losses = []
        for n, (xs, ys) in enumerate(zip(x.chunk(m), y.chunk(m))):
            loss = cross_entropy_loss(model(xs, document_ids=None if ids is None else ids.chunk(m)[n]), ys)
            (loss / m).backward()
            step_losses.append(loss.detach())
        norms.append(float(clip_grad_norm_(model.parameters(), t.max_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(torch.stack(step_losses).mean()))
    return losses, norms


def exit_threads_worker(rank: int, world: int, port: int, dump_folder: str) -> None:
    """Train the tiny recipe, end the process group as the trainer does and write how many
    threads this process had before the group and after it ended."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    from pipelining_seq import p2p
    from pipelining_seq.trainer.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    before = len(os.listdir("/proc/self/task"))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    train(tiny_config(dump_folder, "training.steps=2"))
    during = len(os.listdir("/proc/self/task"))
    p2p.destroy_process_group()
    after = len(os.listdir("/proc/self/task"))
    with open(os.path.join(dump_folder, f"threads{rank}.json"), "w") as f:
        json.dump({"before": before, "during": during, "after": after}, f)
