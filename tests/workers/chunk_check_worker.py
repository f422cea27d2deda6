"""Workers for the multi-rank chunk-exactness tests (spawned processes): hand-made models
with the contract kept or broken, through the three Seq1F1B schedules."""

from __future__ import annotations

import torch

from pipelining_seq import (
    ContractError,
    ScheduleInterleavedSeq1F1B,
    ScheduleSeq1F1B,
    ScheduleSeq1F1BZeroBubble,
    SequencePipelineStage,
)
from pipelining_seq.agreement import AgreementError
from tests.workers.chunk_models import VOCAB, TinyLM, ce


def batch(b: int = 4, s: int = 16):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (b, s), generator=g), torch.randint(0, VOCAB, (b, s), generator=g)


def build(rank: int, world: int, cfg: dict):
    kind, v = cfg["schedule"], 2 if cfg["schedule"] == "I" else 1
    n_stages = world * v
    dtype = getattr(torch, cfg.get("dtype", "float64"))
    ids = list(range(rank, n_stages, world))
    model = dict(attn=cfg.get("attn", "chunked"), positions=cfg.get("positions", "chunk"), n_layers=n_stages)
    parts = [TinyLM(**model, part=(s, n_stages)).to(dtype) for s in ids]
    stages = [SequencePipelineStage(p, s, n_stages, torch.device("cpu")) for p, s in zip(parts, ids)]
    common = dict(n_seq_chunks=cfg.get("k", 4), verify_chunking=cfg.get("verify", True))
    m = cfg.get("m", 2)
    if kind == "1F1B":
        sched = ScheduleSeq1F1B(stages[0], m, ce, **common)
    elif kind == "I":
        sched = ScheduleInterleavedSeq1F1B(stages, m, ce, **common)
    else:
        sched = ScheduleSeq1F1BZeroBubble(stages[0], m, ce, **common)
    return parts, stages, sched


def check_worker(rank: int, world: int, cfg: dict) -> dict:
    """The steps/evals of ``cfg["calls"]``; returns the error each rank raised (None if
    none), the stage modules' forward calls per step, and the check's results."""
    parts, stages, sched = build(rank, world, cfg)
    calls, whole = [0], [0]
    x, y = batch()

    def count(module, args):
        calls[0] += 1
        whole[0] += args[0].shape[1] == x.shape[1]  # a whole sequence: the check's forward

    for p in parts:
        p.register_forward_pre_hook(count)
    docs = torch.zeros_like(x)
    docs[:, 7:] = 1
    out: dict = dict(error=None, kind=None, calls=[], whole_calls=[], results=None)
    for call in cfg.get("calls", ["step"]):  # "step" or "eval", in order
        calls[0] = whole[0] = 0
        kw = {"document_ids": docs} if cfg.get("docs") == "all" or (cfg.get("docs") == "first" and rank == 0) else {}
        run = sched.eval if call == "eval" else sched.step
        try:
            if rank == 0:
                run(x, **kw)
            elif rank == world - 1:
                run(target=y, losses=[], **kw)
            else:
                run(**kw)
        except (ContractError, AgreementError) as e:
            out.update(error=str(e), kind=type(e).__name__, failed_at=call)
            break
        out["calls"].append(calls[0])
        out["whole_calls"].append(whole[0])
    out["results"] = getattr(sched, "chunk_check_results", None)
    out["leftover"] = sum(len(s.kv_cache) for s in stages)
    return out
