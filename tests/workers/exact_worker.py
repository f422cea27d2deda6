"""Workers for the exactness matrix on real training data (packed documents, masked targets,
MLA head sizes, compiled blocks): a pipelined run on this rank's stage against an unchunked
single-process model whose attention is an explicit block-causal softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage
from pipelining_seq.models import split_stage
from tests.workers.parity_worker import VOCAB, make_model, partition_for


class ExplicitMaskAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + block-causal mask) v, written out."""

    def forward(self, q, k, v, *, document_ids=None):
        s = q.shape[2]
        ids = document_ids if document_ids is not None else torch.zeros(q.shape[0], s, dtype=torch.long)
        mask = (ids[:, None, :, None] == ids[:, None, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def document_ids(layout: str, batch: int, seq: int, k: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(7)
    if layout is None:
        return None
    if layout == "one_doc":  # one document spanning every chunk
        return torch.zeros(batch, seq, dtype=torch.long)
    if layout == "single_tokens":  # single-token documents, then a long one
        row = torch.cat([torch.arange(seq // 2), torch.full((seq - seq // 2,), seq // 2)])
        return row.repeat(batch, 1)
    if layout == "at_boundary":  # documents start exactly at the uniform chunk starts, and inside
        starts = torch.zeros(seq, dtype=torch.long)
        starts[:: seq // k] = 1
        starts[seq // k // 2] = 1
        starts[0] = 0
        return starts.cumsum(0).repeat(batch, 1)
    if layout == "crossing":  # random boundaries per row, documents cross chunk boundaries
        rows = []
        for _ in range(batch):
            starts = (torch.rand(seq, generator=g) < 0.15).long()
            starts[0] = 0
            rows.append(starts.cumsum(0))
        return torch.stack(rows)
    raise ValueError(layout)


def masked_targets(y: torch.Tensor, kind: str | None, m: int) -> torch.Tensor:
    y = y.clone()
    seq = y.shape[1]
    if kind in ("prompt", "one_mb_masked"):  # prompt masking, different prompt lengths per row
        for r in range(y.shape[0]):
            y[r, : (3 + 5 * r) % (seq - 1)] = -100
    if kind == "padded":
        for r in range(y.shape[0]):
            y[r, seq - 1 - (4 * r) % (seq // 2):] = -100
    if kind == "one_mb_masked":
        y[: y.shape[0] // m] = -100
    return y


def ce_mean(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def ce_safe(logits, target):
    """Mean over counted targets, 0 when there is none."""
    valid = (target != -100).sum()
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / valid.clamp(min=1)


LOSSES = {"mean": ce_mean, "safe": ce_safe}


def reference(cfg: dict, x, y, ids):
    model = make_model(**cfg.get("model", {}))
    for block in model.layers.values():
        block.attention.attn = ExplicitMaskAttention()
    loss_fn = LOSSES[cfg.get("loss", "mean")]
    m = cfg["m"]
    losses = []
    id_mbs = ids.chunk(m) if ids is not None else [None] * m
    for xs, ys, ds in zip(x.chunk(m), y.chunk(m), id_mbs):
        loss = loss_fn(model(xs, document_ids=ds), ys)
        (loss / m).backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad for n, p in model.named_parameters()}


def batch_for(cfg: dict):
    g = torch.Generator().manual_seed(1)
    b, s = cfg["batch"], cfg["seq"]
    x = torch.randint(0, VOCAB, (b, s), generator=g)
    y = torch.randint(0, VOCAB, (b, s), generator=g)
    return x, masked_targets(y, cfg.get("targets"), cfg["m"]), document_ids(cfg.get("docs"), b, s, cfg["k"])


def run_config(rank: int, world: int, cfg: dict) -> dict:
    m, k, seq = cfg["m"], cfg["k"], cfg["seq"]
    full = make_model(**cfg.get("model", {}))
    part = split_stage(full, rank, world)
    if cfg.get("compile"):
        part.compile_blocks()
    stage = SequencePipelineStage(part, rank, world, torch.device("cpu"))
    sched = ScheduleSeq1F1B(
        stage, m, LOSSES[cfg.get("loss", "mean")], n_seq_chunks=k,
        seq_partition=partition_for(cfg.get("partition", "uniform"), seq, k),
    )
    x, y, ids = batch_for(cfg)
    kw = {} if ids is None else {"document_ids": ids}
    losses, evals = [], []

    def run(fn, out):
        if rank == 0:
            fn(x, target=y if world == 1 else None, losses=out if world == 1 else None, **kw)
        elif rank == world - 1:
            fn(target=y, losses=out, **kw)
        else:
            fn(**kw)

    run(sched.step, losses)
    grads = {n: p.grad.clone() for n, p in part.named_parameters()}
    leftover = len(stage.kv_cache)
    if cfg.get("eval"):
        run(sched.eval, evals)
        leftover += len(stage.kv_cache)
    ref_losses, ref_grads = reference(cfg, x, y, ids)
    return dict(cfg=cfg, losses=losses, evals=evals, ref_losses=ref_losses, leftover=leftover,
                grads=grads, ref_grads={n: ref_grads[n] for n in grads})


def exact_worker(rank: int, world: int, configs: list[dict]) -> list[dict]:
    return [run_config(rank, world, cfg) for cfg in configs]
