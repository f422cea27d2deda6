"""Train the reference GPT from a recipe: ``torchrun -m pipelining_seq.trainer.train recipe.yaml key=value``.

:class:`Trainer` builds everything once (device and mesh, this rank's stages, the
schedule, optimizers, data, resume, metrics) and then runs :meth:`Trainer.train_step`
per step: every rank draws the step's batch (a function of seed and step), the first
stage feeds the inputs and the last stage the targets to ``schedule.step``; gradients
are clipped by their global norm over the pipeline; AdamW and the learning-rate schedule
step on every stage; the rank holding the last stage reports the loss.

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
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import agreement, p2p
from ..agreement import AgreementError
from ..models.gpt import (
    GPT,
    cross_entropy_loss,
    document_ids_from_tokens,
    init_weights,
    split_stage,
    stage_layer_ranges,
)
from . import checkpoint as ckpt
from . import liveness, lock, nonfinite, resume
from .config import ConfigError, JobConfig, load_config, to_dict
from .data import DOCUMENT_SEPARATOR, TokenBatches, load_tokens
from .layout import chunk_lengths, chunking, n_microbatches, resolve_path, schedule_info, stage_ranks
from .metrics import MetricLogger, StageMemory, build_profiler, device_peak_tflops, model_flops_per_token
from .optim import build_optimizer, clip_grad_norm_
from .validation import validate_config

__all__ = ["StepResult", "Trainer", "build_stage_module", "main", "train"]

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one training step produced on this rank."""

    loss: torch.Tensor | None
    """Mean loss of the global batch (ranks holding the last stage), else None."""
    grad_norm: torch.Tensor
    """Global gradient norm over the pipeline, before clipping."""
    lr: float
    """Learning rate the step used."""
    seconds: float
    """Wall time of the step."""
    verdict: nonfinite.Verdict
    """The numerical guard's decision: whether the update was applied, whether to stop."""


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


def _summary(cfg: JobConfig, *, device: torch.device, threads: int, flops: float) -> str:
    g = cfg.model
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(g).parameters())
    ranks = stage_ranks(cfg)
    layers = " | ".join(f"{r.start}-{r.stop - 1}" for r in stage_layer_ranges(g.n_layers, len(ranks)))
    info = schedule_info(cfg)
    p = cfg.parallelism
    chunks = f" k={cfg.seq1f1b.num_seq_chunks} chunks {chunk_lengths(cfg)}" if info.seq_chunks else ""
    tokens = cfg.training.local_batch_size * p.data_parallel_shard_degree * cfg.training.seq_len
    return (
        f"GPT {n_params / 1e6:.2f}M params, {g.n_layers} layers over {len(ranks)} stages (layers {layers}); "
        f"{info.name} m={n_microbatches(cfg)}{chunks}; pp={p.pipeline_parallel_degree} dp_shard={p.data_parallel_shard_degree} "
        f"tp={p.tensor_parallel_degree}; {tokens} tokens/step; {flops / 1e6:.1f} MFLOP/token; device {device.type}"
        + (f", {threads} thread(s)/rank" if device.type == "cpu" else "")
    )


def _wants_bf16(cfg: JobConfig, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.training.mixed_precision_param == "bfloat16"


def build_stage_module(
    cfg: JobConfig, stage_index: int, *, num_stages: int, device: torch.device, mesh: Any = None
) -> nn.Module:
    """Stage ``stage_index`` of the recipe's GPT: cut on the meta device, materialised,
    initialised per parameter name, blocks compiled if asked, then FSDP2/TP over ``mesh``."""
    with torch.device("meta"):
        full = GPT(cfg.model)
    part = split_stage(full, stage_index, num_stages)
    part.to_empty(device=device)
    init_weights(part, seed=cfg.training.seed, n_layers=cfg.model.n_layers)
    if cfg.model.compile:
        part.compile_blocks()
    if mesh is not None:
        from ..parallel import parallelize_stage

        parallelize_stage(
            part, mesh=mesh, mixed_precision=_wants_bf16(cfg, device),
            sequence_parallel=cfg.parallelism.enable_sequence_parallel,
        )
    return part


class Trainer:
    """One rank of a recipe's training run, on the initialised default process group."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.device = _device(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        resume_path = ckpt.resolve_load(cfg)
        _check_agreement(cfg, start_step=ckpt.read_manifest(resume_path)["step"] if resume_path else 0,
                         device=self.device)
        self.threads = _set_threads(cfg, self.device)
        self._setup_mesh()
        self.flops_per_token = model_flops_per_token(cfg.model, seq_len=cfg.training.seq_len)
        if self.rank == 0:
            logger.info("%s", cfg.job.description or "pipelining_seq run")
            logger.info("%s", _summary(cfg, device=self.device, threads=self.threads, flops=self.flops_per_token))
        self.parts = [self._build_part(s) for s in self.stage_ids]
        self.stages, self.schedule = self._build_schedule()
        self.optimizers, self.schedulers = zip(*(build_optimizer(cfg, part) for part in self.parts))
        self.params = [p for part in self.parts for p in part.parameters()]
        t, dp = cfg.training, cfg.parallelism.data_parallel_shard_degree
        self.batches = TokenBatches(
            load_tokens(t.dataset, dtype=t.dataset_dtype, document_masking=t.document_masking), seq_len=t.seq_len,
            global_batch_size=t.local_batch_size * dp,
            seed=t.seed, dp_rank=self.dp_rank, dp_degree=dp,
        )
        self.start_step = self._resume(resume_path)
        self.timeline = _begin_timeline(cfg, resume_path, self.start_step)
        self._setup_metrics()
        self.step_guard = nonfinite.StepGuard(
            skip_budget=t.skip_nonfinite_steps, reporting=self.reporting, device=self.device,
        )

    # ------------------------------------------------------------------------- setup
    def _setup_mesh(self) -> None:
        cfg, p = self.cfg, self.cfg.parallelism
        self.mesh = None
        if p.data_parallel_shard_degree * p.tensor_parallel_degree > 1:
            from ..parallel import build_mesh

            self.mesh = build_mesh(
                pp=p.pipeline_parallel_degree, dp_shard=p.data_parallel_shard_degree, tp=p.tensor_parallel_degree,
                device_type=self.device.type,
            )
        mesh = self.mesh
        self.pp_group = mesh["pp"].get_group() if mesh is not None else dist.group.WORLD
        pp_rank = mesh["pp"].get_local_rank() if mesh is not None else self.rank
        self.dp_rank = mesh["dp_shard"].get_local_rank() if mesh is not None else 0
        self.tp_rank = mesh["tp"].get_local_rank() if mesh is not None else 0
        ranks = stage_ranks(cfg)
        self.num_stages = len(ranks)
        self.stage_ids = [s for s, r in enumerate(ranks) if r == pp_rank]
        self.has_first, self.has_last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids

    def _build_part(self, stage_index: int) -> nn.Module:
        return build_stage_module(
            self.cfg, stage_index, num_stages=self.num_stages, device=self.device, mesh=self.mesh
        )

    def _build_schedule(self) -> tuple[list, Any]:
        cfg, info = self.cfg, schedule_info(self.cfg)
        options = {"verify_chunking": cfg.seq1f1b.verify_chunking} if info.seq_chunks else {}
        schedule, stages = info.build(
            self.parts, self.stage_ids, self.num_stages, self.device, group=self.pp_group,
            n_microbatches=n_microbatches(cfg), loss_fn=cross_entropy_loss,
            chunking=chunking(cfg) if info.seq_chunks else None, **options,
        )
        return stages, schedule

    def _resume(self, load_path: str | None) -> int:
        if load_path is None:
            return 0
        manifest = ckpt.read_manifest(load_path)
        step = ckpt.load_checkpoint(
            load_path, cfg=self.cfg, stage_ids=self.stage_ids, parts=self.parts, optimizers=self.optimizers,
            schedulers=self.schedulers,
        )
        if self.rank == 0:
            logger.info("resumed from %s at step %d", load_path, step)
            resume.report(manifest, self.cfg)
        return step

    def _setup_metrics(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self.reporting = self.has_last and self.dp_rank == 0 and self.tp_rank == 0
        tb = resolve_path(cfg, cfg.metrics.save_tb_folder) if cfg.metrics.enable_tensorboard else None
        self.metric_log = MetricLogger(enabled=self.reporting, total_steps=t.steps, tb_folder=tb)
        self.memory = StageMemory(
            device=self.device, modules=self.parts, kv_caches=[getattr(s, "kv_cache", None) for s in self.stages]
        )
        self.peak_tflops = device_peak_tflops(self.device, cfg.metrics.peak_tflops_per_device) if self.reporting else None
        pr = cfg.profiling
        self.profiler = build_profiler(
            enabled=pr.enable_profiling, folder=resolve_path(cfg, pr.save_traces_folder), rank=self.rank,
            start_step=self.start_step, profile_freq=pr.profile_freq, warmup=pr.profiler_warmup,
            active=pr.profiler_active, record_shapes=pr.record_shapes, profile_memory=pr.profile_memory,
            device=self.device,
        )
        self.tokens_per_step = t.local_batch_size * cfg.parallelism.data_parallel_shard_degree * t.seq_len
        self.mem_key = "stage" + "+".join(str(s) for s in self.stage_ids)

    # -------------------------------------------------------------------------- steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        # With a mesh, FSDP2's MixedPrecisionPolicy owns the bf16 cast (parallelize_stage).
        if _wants_bf16(self.cfg, self.device) and self.mesh is None:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, measure: bool) -> list[torch.Tensor]:
        """Run the schedule on this step's batch; returns the micro-batch losses (last stage)."""
        losses: list[torch.Tensor] = []
        # Packed documents: every stage gets the ids (attention needs them on each).
        documents = {"document_ids": document_ids_from_tokens(x, eos_id=DOCUMENT_SEPARATOR).to(self.device)} \
            if self.cfg.training.document_masking else {}
        with self.memory.measure(measure), self._autocast():
            self.schedule.step(
                *((x.to(self.device),) if self.has_first else ()),
                target=y.to(self.device) if self.has_last else None,
                losses=losses if self.has_last else None,
                # Merged logits are never used here; keeping them would hold every unit's
                # full-vocabulary output until the end of the step.
                return_outputs=False, **documents,
            )
        return losses

    def optimizer_step(self, *, update: bool) -> float:
        """Step every stage's optimizer (unless the guard skips this update) and LR schedule;
        returns the learning rate the step used."""
        lr = float(self.optimizers[0].param_groups[0]["lr"])
        for opt, sched in zip(self.optimizers, self.schedulers):
            if update:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        return lr

    def global_loss(self, losses: list[torch.Tensor]) -> torch.Tensor | None:
        """The mean loss of the global batch on ranks with the last stage (None elsewhere)."""
        if not self.has_last:
            return None
        loss = torch.stack([x.detach() for x in losses]).mean()
        if self.mesh is not None and self.cfg.parallelism.data_parallel_shard_degree > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=self.mesh["dp_shard"].get_group())
        return loss

    def train_step(self, step: int, *, measure: bool = False) -> StepResult:
        """One optimizer step on the batch of ``step``; a non-finite loss or gradient norm is
        caught by the guard before any weight changes."""
        x, y = self.batches.batch(step)
        t0 = time.perf_counter()
        p2p.note(step=step)  # named by timeout messages
        losses = self.forward_backward(x, y, measure=measure)
        grad_norm = clip_grad_norm_(self.params, self.cfg.training.max_norm, pp_group=self.pp_group)
        loss = self.global_loss(losses)
        verdict = self.step_guard.check(
            step=step, loss=loss, grad_norm=grad_norm, stop_requested=liveness.stop_requested()
        )
        lr = self.optimizer_step(update=verdict.update)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, seconds=time.perf_counter() - t0, verdict=verdict)

    def log(self, step: int, result: StepResult, *, steps: int, seconds: float) -> str:
        """Progress line and TensorBoard scalars over the last ``steps`` steps (collective over pp)."""
        peak = _gather_memory(self.mem_key, self.memory.peak_bytes(), self.pp_group)
        tps = self.tokens_per_step * steps / seconds
        tflops = self.flops_per_token * tps / dist.get_world_size() / 1e12
        scalars = {
            "loss/train": float(result.loss) if result.loss is not None else float("nan"),
            "lr": result.lr,
            "grad_norm": float(result.grad_norm),
            "throughput/tokens_per_s": tps,
            "throughput/tflops_per_device": tflops,
            "throughput/step_time_s": seconds / steps,
        }
        if self.peak_tflops:
            scalars["throughput/mfu_pct"] = 100.0 * tflops / self.peak_tflops
        self.peak_memory = peak
        return self.metric_log.log(step, scalars, peak)

    def maybe_save(self, step: int, *, stopping: bool = False) -> None:
        """Save at every ``checkpoint.interval``, the last step, and a signalled stop when asked to."""
        ck = self.cfg.checkpoint
        due = step % ck.interval == 0 or step == self.cfg.training.steps
        if ck.enable and (due or (stopping and ck.save_on_signal)):
            ckpt.save_checkpoint(
                cfg=self.cfg, step=step, stage_ids=self.stage_ids, parts=self.parts, optimizers=self.optimizers,
                schedulers=self.schedulers, timeline=self.timeline,
            )

    # --------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Train to ``training.steps``; returns this rank's record: ``losses`` (per step, on
        ranks with the last stage), ``grad_norms``, ``start_step``, ``log_lines``,
        ``peak_memory`` (at the last log step) and ``stopped`` (the step a signal stopped at)."""
        cfg, start = self.cfg, self.start_step
        total = cfg.training.steps
        record: dict[str, Any] = {
            "losses": [], "grad_norms": [], "start_step": start, "log_lines": [], "peak_memory": {}, "stopped": None,
        }
        try:
            self._loop(record, start, total)
        except (nonfinite.NonFiniteError, ckpt.NonFiniteStateError):
            # Every rank raised it at the same step: the save in flight still gets its manifest.
            ckpt.finish_pending()
            raise
        except BaseException:
            ckpt.abandon_pending()
            raise
        ckpt.finish_pending()
        self.metric_log.close()
        if record["stopped"] is not None:
            if self.rank == 0:
                logger.warning("%s", stop_line(cfg, record["stopped"]))
            return record
        if self.reporting and record["losses"]:
            logger.info("done: loss %.4f -> %.4f over steps %d..%d", record["losses"][0], record["losses"][-1], start + 1, total)
        return record

    def _loop(self, record: dict[str, Any], start: int, total: int) -> None:
        cfg = self.cfg
        window_time, window_steps = 0.0, 0
        with self.profiler as prof:
            for step in range(start + 1, total + 1):
                log_now = step % cfg.metrics.log_freq == 0 or step in (start + 1, total)
                result = self.train_step(step, measure=log_now)
                window_time += result.seconds
                window_steps += 1
                record["grad_norms"].append(float(result.grad_norm))
                if result.loss is not None:
                    record["losses"].append(float(result.loss))
                if log_now:
                    line = self.log(step, result, steps=window_steps, seconds=window_time)
                    record["peak_memory"] = self.peak_memory
                    if line:
                        record["log_lines"].append(line)
                    window_time, window_steps = 0.0, 0
                self.maybe_save(step, stopping=result.verdict.stop)
                prof.step()
                if result.verdict.stop:
                    record["stopped"] = step
                    break


STOP_FILE_ENV = "PIPELINING_SEQ_STOP_FILE"
"""Set by ``pipelining-seq run``: rank 0 writes a stopped run's exit code and line there."""


def stop_line(cfg: JobConfig, step: int) -> str:
    """The one line of a run stopped by a signal at ``step``, with how to resume."""
    ck = cfg.checkpoint
    if ck.enable and ck.save_on_signal:
        how = f" (checkpoint saved); resume with checkpoint.load=latest (job.dump_folder={cfg.job.dump_folder})"
    elif ck.enable:
        how = " (checkpoint.save_on_signal=false: no checkpoint at the stop); resume from the latest with checkpoint.load=latest"
    else:
        how = " (checkpoint.enable=false: nothing to resume from)"
    who = liveness.stop_signal() or "a signal on another rank"
    return f"stopped by {who} after step {step} of {cfg.training.steps}{how}"


def _stopped_code(cfg: JobConfig, step: int) -> int:
    """Exit code of a stopped run: 128 + the signal (SIGTERM's when another rank got it).

    Under ``pipelining-seq run`` rank 0 hands code and line to the launcher in a file and
    the ranks exit 0 (torchrun would print a failure report per rank otherwise); the
    launcher exits with the code."""
    sig = liveness.stop_signal()
    code = 128 + (int(getattr(signal, sig)) if sig else int(signal.SIGTERM))
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return code
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"code": code, "line": stop_line(cfg, step)}, f)
    return 0


def train(cfg: JobConfig) -> dict[str, Any]:
    """Run ``cfg`` on the initialised default process group; returns this rank's record
    (see :meth:`Trainer.train`)."""
    done = _nothing_to_do(cfg)
    if done is not None:
        if dist.get_rank() == 0:
            logger.info("%s", done)
        return {"losses": [], "grad_norms": [], "start_step": cfg.training.steps, "log_lines": [], "peak_memory": {},
                "stopped": None, "nothing_to_do": done}
    return Trainer(cfg).train()


def _nothing_to_do(cfg: JobConfig) -> str | None:
    path = ckpt.resolve_load(cfg)
    return resume.nothing_to_do(ckpt.read_manifest(path), cfg, path) if path is not None else None


def _begin_timeline(cfg: JobConfig, load_path: str | None, start_step: int) -> dict[str, Any]:
    """Rank 0 moves checkpoints of an abandoned timeline aside (see checkpoint.start_timeline)."""
    timeline: dict[str, Any] = {}
    if cfg.checkpoint.enable and dist.get_rank() == 0:
        timeline = ckpt.start_timeline(cfg, resumed_from=start_step if load_path is not None else None)
    dist.barrier()
    return timeline


def _check_agreement(cfg: JobConfig, *, start_step: int, device: torch.device) -> None:
    """Every rank runs the same recipe from the same step (one small collective, before
    any stage is built or any checkpoint read)."""
    d = to_dict(cfg)
    fields = {k: d[k] for k in ("model", "parallelism", "seq1f1b", "training", "optimizer", "lr_scheduler")}
    fields.update(
        start_step=start_step, n_microbatches=n_microbatches(cfg), chunk_lengths=chunk_lengths(cfg),
        stage_ranks=stage_ranks(cfg), world_size=dist.get_world_size(),
    )
    agreement.check(fields, what="recipe", device=device)


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
        from ..tools.testing import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    backend = "nccl" if _device(cfg).type == "cuda" else "gloo"
    liveness.install(timeout_s=cfg.comm.timeout_s, watch_parent="TORCHELASTIC_RUN_ID" in os.environ)
    p2p.set_timeout(cfg.comm.timeout_s)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.comm.timeout_s))
    code = 0
    try:
        with lock.hold_for_job(lock.run_folders(cfg), command=" ".join(sys.argv)):
            record = train(cfg)
        if record.get("stopped") is not None:
            code = _stopped_code(cfg, record["stopped"])
    except (lock.FolderBusyError, ckpt.CheckpointError, ConfigError, AgreementError) as e:
        if rank == 0:
            logger.error("error: %s", e)
        code = 2
    except (nonfinite.NonFiniteError, ckpt.NonFiniteStateError, ckpt.CheckpointSaveError) as e:
        if rank == 0:
            logger.error("error: %s", e)
        code = 3
    except Exception as e:  # noqa: BLE001 - one line per rank instead of a traceback per rank
        logger.error("error: %s", liveness.describe_failure(e, where=p2p.context()))
        logger.debug("traceback", exc_info=True)
        code = 1
    finally:
        if code == 0:
            p2p.destroy_process_group()
    if code:
        # A failed rank may leave peers mid-collective; tearing the group down would wait on them.
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
