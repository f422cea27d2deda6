"""Train the reference GPT from a recipe: ``torchrun -m pipelining_seq.trainer.train recipe.yaml key=value``.

One step: every rank draws the step's batch (a function of seed and step), the first
stage feeds the inputs and the last stage the targets to ``schedule.step``; the schedule
runs the forward/backward units; gradients are clipped by their global norm over the
pipeline; AdamW and the learning-rate schedule step on every stage. The rank holding
the last stage reports the loss.

The model is built on the meta device, cut into stages (``split_stage``; parameter
names stay those of the full model), materialised on the device and initialised per
parameter name from the seed, so every pipeline layout and schedule starts from the same
weights. With ``data_parallel_shard_degree * tensor_parallel_degree > 1`` the ranks form
a ("pp", "dp_shard", "tp") device mesh and each stage goes through
``pipelining_seq.parallel.parallelize_stage`` (FSDP2 / tensor parallel).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import signal
import sys
import time
import zlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class

from ..models.gpt import GPT, cross_entropy_loss, document_ids_from_tokens, split_stage, stage_layer_ranges
from ..partition import balanced_partition
from ..schedules import ScheduleSeq1F1B
from ..stage import SequencePipelineStage
from . import checkpoint as ckpt
from .config import ConfigError, JobConfig, load_config
from .data import DOCUMENT_SEPARATOR, TokenBatches, load_tokens
from .metrics import MetricLogger, StageMemory, build_profiler, device_peak_tflops, model_flops_per_token
from .validation import (
    chunk_lengths,
    n_microbatches,
    resolve_path,
    resolve_schedule,
    stage_ranks,
    validate_config,
)

__all__ = ["build_optimizer", "clip_grad_norm_", "cross_entropy_loss", "init_weights", "lr_factor", "main", "train"]

logger = logging.getLogger(__name__)

# Testing hook: SIGKILL every rank right after this step (and its checkpoint) completes.
KILL_ENV = "PIPELINING_SEQ_KILL_AT_STEP"


def init_weights(module: nn.Module, *, seed: int, n_layers: int, std: float = 0.02) -> None:
    """Initialise every parameter from a generator seeded by ``(seed, parameter name)``.

    Same rule as ``GPT.reset_parameters`` (normal(0, std) matrices, residual projections
    scaled by (2 * n_layers)^-0.5, ones for norms); seeding by name makes the weights
    independent of how the model is cut into stages. Values are drawn on CPU, so a CUDA
    run starts from the same weights as a CPU run.
    """
    for name, p in module.named_parameters():
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62))
        if p.dim() >= 2:
            scale = (2 * n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
            value = torch.empty(p.shape).normal_(0.0, std * scale, generator=g)
        else:
            value = torch.ones(p.shape)
        with torch.no_grad():
            p.copy_(value)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay_type: str, min_lr_factor: float) -> float:
    """LambdaLR factor after ``step`` scheduler steps, i.e. for training step ``step + 1``."""
    s = step + 1
    if warmup_steps and s <= warmup_steps:
        return s / warmup_steps
    if decay_type == "constant":
        return 1.0
    progress = min(max((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    if decay_type == "linear":
        return 1.0 - (1.0 - min_lr_factor) * progress
    return min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm_(
    parameters: Any, max_norm: float, *, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Clip gradients by their global L2 norm over all pipeline stages; return that norm.

    Each rank takes the norm of its own gradients (a DTensor norm is made whole with
    ``full_tensor``), squares it, and the squares are summed over ``pp_group``; every
    rank then scales by the same factor. ``max_norm <= 0`` only measures.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        raise RuntimeError("clip_grad_norm_: no parameter has a gradient on this rank")
    device = params[0].grad.device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for group in ([p.grad for p in params if isinstance(p.grad, DTensor)], [p.grad for p in params if not isinstance(p.grad, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            sq = sq + norm.float() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


# ------------------------------------------------------------------------------ setup
def _device(cfg: JobConfig) -> torch.device:
    want = cfg.training.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def _set_threads(cfg: JobConfig, device: torch.device) -> int:
    if device.type != "cpu":
        return torch.get_num_threads()
    n = cfg.training.num_threads
    if n == 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        n = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(n)
    return n


def _mesh(cfg: JobConfig):
    p = cfg.parallelism
    if p.data_parallel_shard_degree * p.tensor_parallel_degree == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(
        _device(cfg).type,
        (p.pipeline_parallel_degree, p.data_parallel_shard_degree, p.tensor_parallel_degree),
        mesh_dim_names=("pp", "dp_shard", "tp"),
    )


def _build_parts(cfg: JobConfig, stage_ids: list[int], *, device: torch.device, mesh) -> list[nn.Module]:
    gpt_cfg = cfg.model.to_gpt_config()
    num_stages = len(stage_ranks(cfg))
    with torch.device("meta"):
        full = GPT(gpt_cfg)
    parts = []
    for s in stage_ids:
        part = split_stage(full, s, num_stages)
        part.to_empty(device=device)
        init_weights(part, seed=cfg.training.seed, n_layers=gpt_cfg.n_layers)
        if gpt_cfg.compile:
            part.compile_blocks()
        if mesh is not None:
            from pipelining_seq.parallel import parallelize_stage

            parallelize_stage(
                part, mesh=mesh, mixed_precision=_wants_bf16(cfg, device),
                sequence_parallel=cfg.parallelism.enable_sequence_parallel,
            )
        parts.append(part)
    return parts


def _wants_bf16(cfg: JobConfig, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.training.mixed_precision_param == "bfloat16"


def _build_schedule(cfg: JobConfig, parts: list[nn.Module], stage_ids: list[int], *, device, pp_group):
    info = resolve_schedule(cfg.parallelism.pipeline_parallel_schedule)
    num_stages = len(stage_ranks(cfg))
    m = n_microbatches(cfg)
    if info.name == "Seq1F1B":
        s, g = cfg.seq1f1b, cfg.model.to_gpt_config()
        stage = SequencePipelineStage(parts[0], stage_ids[0], num_stages, device, group=pp_group)
        partition: Any = s.partition
        if partition == "balanced":
            partition = functools.partial(
                balanced_partition, n_chunks=s.num_seq_chunks, num_layers=g.n_layers, hidden_size=g.dim,
                num_heads=g.n_heads, ffn_hidden_size=g.ffn_dim, vocab_size=g.vocab_size, multiple_of=s.multiple_of,
            )
        elif not isinstance(partition, str):
            partition = list(partition)
        schedule = ScheduleSeq1F1B(
            stage, m, cross_entropy_loss, n_seq_chunks=s.num_seq_chunks, seq_partition=partition,
            scale_grads=True, seq_len=cfg.training.seq_len if callable(partition) or partition == "uniform" else None,
        )
        return [stage], schedule
    stages = [PipelineStage(part, s, num_stages, device, group=pp_group) for part, s in zip(parts, stage_ids)]
    cls = get_schedule_class(info.name)
    if info.multi_stage:
        return stages, cls(stages, n_microbatches=m, loss_fn=cross_entropy_loss, scale_grads=True)
    return stages, cls(stages[0], n_microbatches=m, loss_fn=cross_entropy_loss, scale_grads=True)


def build_optimizer(cfg: JobConfig, part: nn.Module):
    """AdamW (weight decay on matrices only) and its warm-up + decay LambdaLR for one stage."""
    o, s = cfg.optimizer, cfg.lr_scheduler
    decay = [p for p in part.parameters() if p.dim() >= 2]
    no_decay = [p for p in part.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    factor = functools.partial(
        lr_factor, warmup_steps=s.warmup_steps, total_steps=cfg.training.steps, decay_type=s.decay_type,
        min_lr_factor=s.min_lr_factor,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _summary(cfg: JobConfig, *, device: torch.device, threads: int, flops: float) -> str:
    g = cfg.model.to_gpt_config()
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(g).parameters())
    ranks = stage_ranks(cfg)
    layers = " | ".join(f"{r.start}-{r.stop - 1}" for r in stage_layer_ranges(g.n_layers, len(ranks)))
    info = resolve_schedule(cfg.parallelism.pipeline_parallel_schedule)
    p = cfg.parallelism
    chunks = f" k={cfg.seq1f1b.num_seq_chunks} chunks {chunk_lengths(cfg)}" if info.name == "Seq1F1B" else ""
    tokens = cfg.training.local_batch_size * p.data_parallel_shard_degree * cfg.training.seq_len
    return (
        f"GPT {n_params / 1e6:.2f}M params, {g.n_layers} layers over {len(ranks)} stages (layers {layers}); "
        f"{info.name} m={n_microbatches(cfg)}{chunks}; pp={p.pipeline_parallel_degree} dp_shard={p.data_parallel_shard_degree} "
        f"tp={p.tensor_parallel_degree}; {tokens} tokens/step; {flops / 1e6:.1f} MFLOP/token; device {device.type}"
        + (f", {threads} thread(s)/rank" if device.type == "cpu" else "")
    )


# ------------------------------------------------------------------------------- loop
def train(cfg: JobConfig) -> dict[str, Any]:
    """Run ``cfg`` on the initialised default process group; returns this rank's record.

    The record holds ``losses`` (per step, on ranks with the last stage; empty elsewhere),
    ``grad_norms``, ``start_step``, ``log_lines`` and ``peak_memory`` (last log step).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = _set_threads(cfg, device)
    mesh = _mesh(cfg)
    pp_group = mesh["pp"].get_group() if mesh is not None else dist.group.WORLD
    pp_rank = mesh["pp"].get_local_rank() if mesh is not None else rank
    dp_rank = mesh["dp_shard"].get_local_rank() if mesh is not None else 0
    tp_rank = mesh["tp"].get_local_rank() if mesh is not None else 0
    placement = stage_ranks(cfg)
    stage_ids = [s for s, r in enumerate(placement) if r == pp_rank]
    has_first, has_last = 0 in stage_ids, len(placement) - 1 in stage_ids

    gpt_cfg = cfg.model.to_gpt_config()
    flops_per_token = model_flops_per_token(gpt_cfg, seq_len=cfg.training.seq_len)
    if rank == 0:
        logger.info("%s", cfg.job.description or "pipelining_seq run")
        logger.info("%s", _summary(cfg, device=device, threads=threads, flops=flops_per_token))
    parts = _build_parts(cfg, stage_ids, device=device, mesh=mesh)
    stages, schedule = _build_schedule(cfg, parts, stage_ids, device=device, pp_group=pp_group)
    optimizers, schedulers = zip(*(build_optimizer(cfg, part) for part in parts))
    params = [p for part in parts for p in part.parameters()]

    dp = cfg.parallelism.data_parallel_shard_degree
    t = cfg.training
    batches = TokenBatches(
        load_tokens(t.dataset, dtype=t.dataset_dtype, document_masking=t.document_masking), seq_len=t.seq_len, global_batch_size=t.local_batch_size * dp,
        seed=t.seed, dp_rank=dp_rank, dp_degree=dp,
    )
    start_step = 0
    load_path = ckpt.resolve_load(cfg)
    if rank == 0 and cfg.checkpoint.enable and load_path is None:
        old = [s for s, _ in ckpt.find_checkpoints(resolve_path(cfg, cfg.checkpoint.folder))]
        if old:
            logger.warning(
                "checkpoint.folder holds steps %s of an earlier run; this run starts fresh and replaces them as it "
                "reaches them (checkpoint.load=latest resumes instead)", old,
            )
    if load_path is not None:
        start_step = ckpt.load_checkpoint(
            load_path, cfg=cfg, stage_ids=stage_ids, parts=parts, optimizers=optimizers, schedulers=schedulers,
        )
        if rank == 0:
            logger.info("resumed from %s at step %d", load_path, start_step)

    reporting = has_last and dp_rank == 0 and tp_rank == 0
    tb = resolve_path(cfg, cfg.metrics.save_tb_folder) if cfg.metrics.enable_tensorboard else None
    metric_log = MetricLogger(enabled=reporting, total_steps=t.steps, tb_folder=tb)
    memory = StageMemory(device=device, modules=parts, kv_caches=[getattr(s, "kv_cache", None) for s in stages])
    peak_tflops = device_peak_tflops(device, cfg.metrics.peak_tflops_per_device) if reporting else None
    pr = cfg.profiling
    profiler = build_profiler(
        enabled=pr.enable_profiling, folder=resolve_path(cfg, pr.save_traces_folder), rank=rank, start_step=start_step,
        profile_freq=pr.profile_freq, warmup=pr.profiler_warmup, active=pr.profiler_active,
        record_shapes=pr.record_shapes, profile_memory=pr.profile_memory, device=device,
    )
    amp = (
        # With a mesh, FSDP2's MixedPrecisionPolicy owns the bf16 cast (parallelize_stage).
        torch.autocast("cuda", dtype=torch.bfloat16) if _wants_bf16(cfg, device) and mesh is None else contextlib.nullcontext()
    )
    mem_key = "stage" + "+".join(str(s) for s in stage_ids)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    tokens_per_step = t.local_batch_size * dp * t.seq_len
    record: dict[str, Any] = {"losses": [], "grad_norms": [], "start_step": start_step, "log_lines": [], "peak_memory": {}}
    window_time, window_steps = 0.0, 0

    with profiler as prof:
        for step in range(start_step + 1, t.steps + 1):
            x, y = batches.batch(step)
            # Packed documents: every stage gets the ids (attention needs them on each).
            doc_kw = {"document_ids": document_ids_from_tokens(x, eos_id=DOCUMENT_SEPARATOR).to(device)} \
                if t.document_masking else {}
            log_now = step % cfg.metrics.log_freq == 0 or step in (start_step + 1, t.steps)
            losses: list[torch.Tensor] = []
            t0 = time.perf_counter()
            with memory.measure(log_now), amp:
                schedule.step(
                    *((x.to(device),) if has_first else ()), target=y.to(device) if has_last else None,
                    losses=losses if has_last else None,
                    # Merged logits are never used here; keeping them would hold every unit's
                    # full-vocabulary output until the end of the step.
                    return_outputs=False, **doc_kw,
                )
            grad_norm = clip_grad_norm_(params, t.max_norm, pp_group=pp_group)
            lr = float(optimizers[0].param_groups[0]["lr"])
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
            loss = torch.stack([x.detach() for x in losses]).mean() if has_last else None
            if loss is not None and dp > 1:  # the loss of the global batch
                dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=mesh["dp_shard"].get_group())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            window_time += time.perf_counter() - t0
            window_steps += 1
            record["grad_norms"].append(float(grad_norm))
            if loss is not None:
                record["losses"].append(float(loss))
            if log_now:
                record["peak_memory"] = _gather_memory(mem_key, memory.peak_bytes(), pp_group)
                tps = tokens_per_step * window_steps / window_time
                tflops = flops_per_token * tps / world / 1e12
                scalars = {
                    "loss/train": float(loss) if loss is not None else float("nan"),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "throughput/tokens_per_s": tps,
                    "throughput/tflops_per_device": tflops,
                    "throughput/step_time_s": window_time / window_steps,
                }
                if peak_tflops:
                    scalars["throughput/mfu_pct"] = 100.0 * tflops / peak_tflops
                line = metric_log.log(step, scalars, record["peak_memory"])
                if line:
                    record["log_lines"].append(line)
                window_time, window_steps = 0.0, 0
            if cfg.checkpoint.enable and (step % cfg.checkpoint.interval == 0 or step == t.steps):
                ckpt.save_checkpoint(
                    cfg=cfg, step=step, stage_ids=stage_ids, parts=parts, optimizers=optimizers,
                    schedulers=schedulers, writer=dp_rank == 0 and tp_rank == 0,
                )
            prof.step()
            if step == kill_at:
                logger.warning("%s=%d: killing rank %d", KILL_ENV, kill_at, rank)
                os.kill(os.getpid(), signal.SIGKILL)
    metric_log.close()
    if reporting and record["losses"]:
        logger.info("done: loss %.4f -> %.4f over steps %d..%d", record["losses"][0], record["losses"][-1], start_step + 1, t.steps)
    return record


def _gather_memory(key: str, nbytes: int, pp_group) -> dict[str, int]:
    """``{"stage<i>": peak bytes}`` of every pipeline rank (collective over the pp group)."""
    out: list[Any] = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(out, (key, nbytes), group=pp_group)
    return dict(sorted(out, key=lambda kv: int(kv[0][5:].split("+")[0])))


# ------------------------------------------------------------------------------- main
def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelining_seq.trainer.train", description="Train from a recipe (run under torchrun)."
    )
    parser.add_argument("config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    _setup_logging(rank)
    try:
        cfg = load_config(args.config, args.overrides)
        validate_config(cfg, world_size=world)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if world == 1 and "MASTER_ADDR" not in os.environ:  # plain `python -m`, no torchrun
        from ..testing import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    backend = "nccl" if _device(cfg).type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    try:
        train(cfg)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
