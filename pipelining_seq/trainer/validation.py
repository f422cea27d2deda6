"""The checks a recipe must pass before any process starts.

:func:`validate_config` checks everything that depends on several fields (stage layout,
micro-batches, chunk lengths, parallel degrees, data, checkpoints) and names the knob to
change. The settings it checks are derived in :mod:`pipelining_seq.trainer.layout`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from ..registry import check_admissible
from .config import ConfigError, JobConfig
from .layout import chunk_lengths, n_microbatches, schedule_info, stages_per_rank

__all__ = ["validate_config"]


def validate_config(cfg: JobConfig, *, world_size: int | None = None, machine: bool = True) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``; starts no process.

    ``world_size`` (when known) must equal pp * dp_shard * tp. ``machine=False`` checks the
    recipe only (what ``plan`` needs, for a recipe meant for another machine): no data
    file, output folder, disk space, checkpoint or CUDA device is looked at.
    """
    errors: list[str] = []
    from . import preflight

    for check in (_check_training, _check_optimizer, _check_parallelism, _check_outputs, preflight.field_problems):
        errors += check(cfg, world_size)
    if not errors:  # these read the combination, so they need the basics right
        errors += _check_seq1f1b(cfg)
    if not errors and machine:
        errors += _check_machine(cfg) + _check_checkpoint(cfg)
    if not errors and machine:
        errors += preflight.machine_problems(cfg)
    if errors:
        raise ConfigError(errors)


def _positive(errors: list[str], **knobs: Any) -> None:
    for knob, value in knobs.items():
        if not isinstance(value, (int, float)) or value <= 0:
            errors.append(f"{knob.replace('__', '.')}={value} must be positive")


def _one_of(errors: list[str], knob: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        errors.append(f"{knob}={value!r}: use one of {', '.join(choices)}")


def _check_training(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    t = cfg.training
    _positive(errors, training__seq_len=t.seq_len, training__local_batch_size=t.local_batch_size, training__steps=t.steps)
    if t.max_norm < 0:
        errors.append(f"training.max_norm={t.max_norm} must be >= 0 (0 disables clipping)")
    if t.num_threads < 0:
        errors.append(f"training.num_threads={t.num_threads} must be >= 0 (0 = automatic)")
    _one_of(errors, "training.mixed_precision_param", t.mixed_precision_param, ("bfloat16", "float32"))
    _one_of(errors, "training.device", t.device, ("auto", "cpu", "cuda"))
    _one_of(errors, "training.dataset_dtype", t.dataset_dtype, ("uint16", "uint32"))
    if t.document_masking and t.dataset != "builtin":
        errors.append(
            f"training.document_masking=true needs training.dataset=builtin (got {t.dataset!r}): token files "
            "carry no document separator this trainer knows; set training.document_masking=false"
        )
    return errors


def _check_machine(cfg: JobConfig) -> list[str]:
    """What the recipe asks of this machine: the CUDA device, the data file."""
    errors: list[str] = []
    t = cfg.training
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append("training.device='cuda' but no CUDA device is available: use training.device=cpu or auto")
    from . import data

    try:
        info = data.inspect_dataset(t.dataset, dtype=t.dataset_dtype)
    except (OSError, ValueError) as e:
        return [f"training.dataset={t.dataset!r}: {e}"]
    if info.n_tokens < t.seq_len + 1:
        errors.append(
            f"training.dataset={t.dataset!r} holds {info.n_tokens} tokens, fewer than training.seq_len + 1 = "
            f"{t.seq_len + 1}: lower training.seq_len or use a larger dataset"
        )
    if info.max_token >= cfg.model.vocab_size:
        errors.append(
            f"training.dataset={t.dataset!r} has token id {info.max_token} but model.vocab_size={cfg.model.vocab_size}: "
            f"raise model.vocab_size to at least {info.max_token + 1} (or check training.dataset_dtype)"
        )
    return errors


def _check_optimizer(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    o, s = cfg.optimizer, cfg.lr_scheduler
    if o.name.lower() != "adamw":
        errors.append(f"optimizer.name={o.name!r}: only AdamW is supported")
    _positive(errors, optimizer__lr=o.lr, optimizer__eps=o.eps)
    if o.weight_decay < 0:
        errors.append(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        errors.append(f"optimizer.betas={list(o.betas)}: need two values in [0, 1)")
    if s.warmup_steps < 0:
        errors.append(f"lr_scheduler.warmup_steps={s.warmup_steps} must be >= 0")
    _one_of(errors, "lr_scheduler.decay_type", s.decay_type, ("cosine", "linear", "constant"))
    if not 0 <= s.min_lr_factor <= 1:
        errors.append(f"lr_scheduler.min_lr_factor={s.min_lr_factor} must be in [0, 1]")
    return errors


def _check_parallelism(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    p, m = cfg.parallelism, cfg.model
    pp, dp, tp = p.pipeline_parallel_degree, p.data_parallel_shard_degree, p.tensor_parallel_degree
    _positive(
        errors, parallelism__pipeline_parallel_degree=pp, parallelism__data_parallel_shard_degree=dp,
        parallelism__tensor_parallel_degree=tp, parallelism__pipeline_parallel_microbatch_size=p.pipeline_parallel_microbatch_size,
    )
    try:
        info = schedule_info(cfg)
    except ConfigError as e:
        errors += e.errors
    if errors:
        return errors
    if world_size is not None and world_size != pp * dp * tp:
        errors.append(
            f"{world_size} processes but parallelism.pipeline_parallel_degree ({pp}) * data_parallel_shard_degree ({dp}) "
            f"* tensor_parallel_degree ({tp}) = {pp * dp * tp}: make them agree (--nproc-per-node {pp * dp * tp})"
        )
    try:
        spr = stages_per_rank(cfg)
    except ConfigError as e:
        return errors + [f"{e} (or set it to null for the schedule's default)"]
    if errors:
        return errors
    n_stages = pp * spr
    if m.n_layers % n_stages:
        where = "parallelism.pipeline_parallel_degree" + (" * pipeline_parallel_stages_per_rank" if spr > 1 else "")
        errors.append(
            f"model.n_layers={m.n_layers} cannot be split evenly over {n_stages} pipeline stages ({where}): "
            f"use a multiple of {n_stages} layers or change {where.split(' ')[0]}"
        )
    mbs = p.pipeline_parallel_microbatch_size
    if cfg.training.local_batch_size % mbs:
        errors.append(
            f"training.local_batch_size={cfg.training.local_batch_size} is not divisible by "
            f"parallelism.pipeline_parallel_microbatch_size={mbs}: make the batch a multiple of the micro-batch size"
        )
        return errors
    nmb = n_microbatches(cfg)
    k = cfg.seq1f1b.num_seq_chunks
    if k >= 1:
        try:  # the registry holds each schedule's rule; this names the recipe's knobs
            check_admissible(info, pp=pp, n_microbatches=nmb, n_seq_chunks=k if info.seq_chunks else 1,
                             stages_per_rank=spr)
        except ValueError as e:
            chunks = ", n_seq_chunks = seq1f1b.num_seq_chunks" if info.seq_chunks else ""
            errors.append(
                f"{e} (in the recipe: n_microbatches = training.local_batch_size / "
                f"parallelism.pipeline_parallel_microbatch_size = {nmb}{chunks})"
            )
    if tp > 1:
        for knob, val in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads), ("model.ffn_dim", m.ffn_dim)):
            if val % tp:
                errors.append(f"{knob}={val} is not divisible by parallelism.tensor_parallel_degree={tp}")
    if p.enable_sequence_parallel and tp == 1:
        errors.append("parallelism.enable_sequence_parallel=true needs parallelism.tensor_parallel_degree > 1")
    if dp * tp > 1 and importlib.util.find_spec("pipelining_seq.parallel") is None:
        errors.append(
            "parallelism.data_parallel_shard_degree/tensor_parallel_degree > 1 need pipelining_seq.parallel, which this "
            "install lacks: set both to 1"
        )
    return errors


def _check_outputs(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    mt, pr, ck = cfg.metrics, cfg.profiling, cfg.checkpoint
    _positive(errors, metrics__log_freq=mt.log_freq, profiling__profile_freq=pr.profile_freq,
              profiling__profiler_active=pr.profiler_active, checkpoint__interval=ck.interval)
    if mt.peak_tflops_per_device is not None and mt.peak_tflops_per_device <= 0:
        errors.append(f"metrics.peak_tflops_per_device={mt.peak_tflops_per_device} must be positive (or null)")
    if pr.profiler_warmup < 0 or pr.profiler_warmup + pr.profiler_active > pr.profile_freq:
        errors.append(
            f"profiling.profiler_warmup ({pr.profiler_warmup}) + profiler_active ({pr.profiler_active}) must fit in "
            f"profiling.profile_freq ({pr.profile_freq})"
        )
    if ck.keep_latest_k < 0:
        errors.append(f"checkpoint.keep_latest_k={ck.keep_latest_k} must be >= 0 (0 keeps all)")
    return errors


def _check_seq1f1b(cfg: JobConfig) -> list[str]:
    s, seq = cfg.seq1f1b, cfg.training.seq_len
    tp = cfg.parallelism.tensor_parallel_degree
    if not schedule_info(cfg).seq_chunks:
        if cfg.parallelism.enable_sequence_parallel and seq % tp:
            return [f"training.seq_len={seq} must be a multiple of parallelism.tensor_parallel_degree={tp} with sequence parallelism"]
        return []
    errors: list[str] = []
    _positive(errors, seq1f1b__num_seq_chunks=s.num_seq_chunks, seq1f1b__multiple_of=s.multiple_of)
    part = s.partition
    if isinstance(part, str):
        _one_of(errors, "seq1f1b.partition", part, ("uniform", "balanced"))
    elif not (isinstance(part, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in part)):
        errors.append(f"seq1f1b.partition={part!r}: use uniform, balanced or a list of integer chunk lengths")
    if errors:
        return errors
    try:
        lengths = chunk_lengths(cfg)
    except ValueError as e:
        msg = str(e).replace("n_seq_chunks", "seq1f1b.num_seq_chunks").replace("multiple_of=", "seq1f1b.multiple_of=")
        return [f"seq1f1b.partition={part!r} with seq1f1b.num_seq_chunks={s.num_seq_chunks} and training.seq_len={seq}: {msg}"]
    if cfg.parallelism.enable_sequence_parallel and any(n % tp for n in lengths):
        errors.append(
            f"chunk lengths {lengths} must be multiples of parallelism.tensor_parallel_degree={tp} with sequence "
            "parallelism: set seq1f1b.multiple_of to a multiple of it (balanced) or pick lengths that are"
        )
    return errors


def _check_checkpoint(cfg: JobConfig) -> list[str]:
    ck = cfg.checkpoint
    if not ck.enable and ck.load is None:
        return []
    from . import checkpoint

    return checkpoint.config_problems(cfg)
