"""Workers for the Seq1F1B-I / Seq1F1B-ZB multi-rank parity tests (spawned processes)."""

from __future__ import annotations

import torch

from pipelining_seq import ScheduleInterleavedSeq1F1B, ScheduleSeq1F1BZeroBubble, SequencePipelineStage
from pipelining_seq.models import split_stage
from tests.workers.parity_worker import ce_loss, drive, make_batch, make_model, max_diffs, partition_for, reference


def _record(stage, log: list) -> None:
    """Log every compute call the runtime makes on ``stage`` as (kind, stage, unit)."""
    fwd, bwd, wgt = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk

    def forward_one_chunk(u, *a, **kw):
        log.append(("F", stage.stage_index, u))
        return fwd(u, *a, **kw)

    def backward_one_chunk(u, loss=None, full_backward=True, last_backward=False):
        log.append(("B" if full_backward else "I", stage.stage_index, u))
        return bwd(u, loss=loss, full_backward=full_backward, last_backward=last_backward)

    def backward_weight_one_chunk(u, last_backward=False):
        log.append(("W", stage.stage_index, u))
        return wgt(u, last_backward=last_backward)

    stage.forward_one_chunk = forward_one_chunk
    stage.backward_one_chunk = backward_one_chunk
    stage.backward_weight_one_chunk = backward_weight_one_chunk


def multi_parity_worker(rank: int, world: int, configs: list[dict]) -> list[dict]:
    results = []
    for cfg in configs:
        m, k, batch, seq = cfg["m"], cfg["k"], cfg["batch"], cfg["seq"]
        kind, v = cfg["schedule"], cfg.get("v", 1)
        n_stages = world * v
        model_kwargs = dict(cfg.get("model", {}), n_layers=max(4, n_stages))
        full = make_model(**model_kwargs)
        parts = [split_stage(full, s, n_stages) for s in range(rank, n_stages, world)]
        stages = [SequencePipelineStage(part, s, n_stages, torch.device("cpu"))
                  for part, s in zip(parts, range(rank, n_stages, world))]
        log: list = []
        for st in stages:
            _record(st, log)
        common = dict(n_seq_chunks=k, seq_partition=partition_for(cfg.get("partition", "uniform"), seq, k))
        if kind == "I":
            sched = ScheduleInterleavedSeq1F1B(stages, m, ce_loss, **common)
        else:
            sched = ScheduleSeq1F1BZeroBubble(stages[0] if cfg.get("single") else stages, m, ce_loss, **common)
        x, y = make_batch(batch, seq)
        losses: list = []
        evals: list = []
        for _ in range(cfg.get("steps", 1)):
            for part in parts:
                for p in part.parameters():
                    p.grad = None
            log.clear()
            drive(sched, rank, world, x, y, losses)
        ran = list(log)
        grads = {n: p.grad.clone() for part in parts for n, p in part.named_parameters()}
        leftover = sum(len(st.kv_cache) for st in stages)
        if cfg.get("eval"):
            for part in parts:
                for p in part.parameters():
                    p.grad = None
            drive(sched, rank, world, x, y, evals, evaluate=True)
            leftover += sum(len(st.kv_cache) for st in stages)
        ref_losses, ref_grads = reference(model_kwargs, batch, seq, m)
        results.append(dict(
            cfg=cfg, **max_diffs(grads, losses, evals, ref_losses, ref_grads), n_losses=len(losses),
            n_evals=len(evals), leftover=leftover, ran=ran, ir=sched.compute_orders[rank], n_params=len(grads),
            n_params_full=len(list(full.parameters())),
        ))
    return results
