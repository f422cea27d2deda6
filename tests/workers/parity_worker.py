"""Worker functions for multi-rank parity tests (importable by spawned processes)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage, balanced_partition
from pipelining_seq.models import GPT, GPTConfig, split_stage

VOCAB = 64


def make_model(seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_layers=4, dim=32, n_heads=4, n_kv_heads=2, mlp="swiglu")
    cfg.update(over)
    return GPT(GPTConfig(**cfg)).double()


def make_batch(batch: int, seq: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch, seq), generator=g)
    y = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return x, y


def ce_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def reference(model_kwargs: dict, batch: int, seq: int, m: int):
    """Single-process full-sequence loss per micro-batch and gradients (mean over m)."""
    model = make_model(**model_kwargs)
    x, y = make_batch(batch, seq)
    losses = []
    for xs, ys in zip(x.chunk(m), y.chunk(m)):
        loss = ce_loss(model(xs), ys)
        (loss / m).backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return torch.stack(losses), grads


def partition_for(name, seq, k):
    if name == "uniform":
        return "uniform"
    if name == "balanced":
        return functools.partial(
            balanced_partition, n_chunks=k, num_layers=4, hidden_size=32, num_heads=4,
            ffn_hidden_size=88, vocab_size=VOCAB,
        )
    return list(name)


def drive(sched, rank: int, world: int, x, y, losses: list, *, evaluate: bool = False) -> None:
    """One ``step`` (or ``eval``) with the inputs on the first rank and the targets on the last."""
    run = sched.eval if evaluate else sched.step
    if rank == 0:
        run(x)
    elif rank == world - 1:
        run(target=y, losses=losses)
    else:
        run()


def max_diffs(grads: dict, losses: list, evals: list, ref_losses, ref_grads: dict) -> dict:
    """Largest absolute differences from the single-process reference (returned across processes)."""
    return dict(
        grad=max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
        loss=(torch.stack(losses) - ref_losses).abs().max().item() if losses else 0.0,
        eval=(torch.stack(evals) - ref_losses).abs().max().item() if evals else 0.0,
    )


def parity_worker(rank: int, world: int, configs: list[dict]) -> list[dict]:
    """Run each config on this rank's stage; return max diffs vs the local reference."""
    results = []
    for cfg in configs:
        m, k, batch, seq = cfg["m"], cfg["k"], cfg["batch"], cfg["seq"]
        model_kwargs = cfg.get("model", {})
        full = make_model(**model_kwargs)
        part = split_stage(full, rank, world)
        stage = SequencePipelineStage(part, rank, world, torch.device("cpu"))
        sched = ScheduleSeq1F1B(
            stage, m, ce_loss, n_seq_chunks=k,
            seq_partition=partition_for(cfg.get("partition", "uniform"), seq, k),
            early_recv=cfg.get("early_recv"),
        )
        x, y = make_batch(batch, seq)
        losses: list = []
        evals: list = []
        drive(sched, rank, world, x, y, losses)
        grads = {n: p.grad.clone() for n, p in part.named_parameters()}
        leftover = len(stage.kv_cache)
        if cfg.get("eval"):
            for p in part.parameters():
                p.grad = None
            drive(sched, rank, world, x, y, evals, evaluate=True)
            leftover += len(stage.kv_cache)
        ref_losses, ref_grads = reference(model_kwargs, batch, seq, m)
        results.append(dict(cfg=cfg, **max_diffs(grads, losses, evals, ref_losses, ref_grads), n_losses=len(losses),
                            n_evals=len(evals), leftover=leftover, lengths=sched.chunk_lengths,
                            n_params=len(grads), n_params_full=len(list(full.parameters()))))
    return results
