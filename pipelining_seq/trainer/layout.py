"""Settings derived from a recipe, each computed in one place.

The training loop, validation, checkpoints, the launcher and the planner all ask these
functions instead of re-deriving a setting from the raw fields: the schedule (resolved by
:mod:`pipelining_seq.registry`), the world size, micro-batches, which rank holds which
stage, the stage layout a checkpoint must match, and the Seq1F1B chunk lengths.
"""

from __future__ import annotations

import os
from typing import Any

from .. import registry
from ..chunking import ChunkingConfig
from ..models.gpt import flop_model, stage_layer_ranges
from ..partition import SeqPartition
from .config import ConfigError, JobConfig

__all__ = [
    "chunk_lengths",
    "chunking",
    "n_microbatches",
    "pipeline_layout",
    "resolve_path",
    "schedule_info",
    "seq_partition",
    "stage_ranks",
    "stages_per_rank",
    "world_size",
]


def schedule_info(cfg: JobConfig) -> registry.ScheduleInfo:
    """The recipe's schedule (any capitalisation); ConfigError naming the knob if unknown."""
    try:
        return registry.resolve_schedule(cfg.parallelism.pipeline_parallel_schedule)
    except ValueError as e:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule: {e}") from None


def world_size(cfg: JobConfig) -> int:
    """Processes the recipe needs: pp * dp_shard * tp."""
    p = cfg.parallelism
    return p.pipeline_parallel_degree * p.data_parallel_shard_degree * p.tensor_parallel_degree


def n_microbatches(cfg: JobConfig) -> int:
    """Micro-batches per step on each data-parallel rank."""
    return cfg.training.local_batch_size // cfg.parallelism.pipeline_parallel_microbatch_size


def stages_per_rank(cfg: JobConfig) -> int:
    """Stages each pipeline rank holds (the recipe's value or the schedule's default)."""
    info = schedule_info(cfg)
    try:
        return registry.stages_per_rank(info, cfg.parallelism.pipeline_parallel_stages_per_rank)
    except ValueError as e:
        raise ConfigError(f"parallelism.pipeline_parallel_stages_per_rank: {e}") from None


def stage_ranks(cfg: JobConfig) -> list[int]:
    """Pipeline rank (within the pp group) holding each stage."""
    return registry.stage_ranks(
        schedule_info(cfg), pp=cfg.parallelism.pipeline_parallel_degree, stages_per_rank=stages_per_rank(cfg)
    )


def pipeline_layout(cfg: JobConfig) -> dict[str, Any]:
    """How the model is cut into stages: what a checkpoint must match to be loaded."""
    ranks = stage_ranks(cfg)
    ranges = stage_layer_ranges(cfg.model.n_layers, len(ranks))
    return {
        "num_stages": len(ranks),
        "pipeline_parallel_degree": cfg.parallelism.pipeline_parallel_degree,
        "stage_ranks": ranks,
        "stage_layers": [[r.start, r.stop] for r in ranges],
    }


def chunking(cfg: JobConfig) -> ChunkingConfig:
    """The recipe's ``seq1f1b`` section as the schedules' :class:`~pipelining_seq.ChunkingConfig`
    (``num_seq_chunks`` is its ``n_seq_chunks``; ``balanced`` over the recipe's model)."""
    s = cfg.seq1f1b
    part = s.partition if isinstance(s.partition, str) else list(s.partition)
    return ChunkingConfig(
        n_seq_chunks=s.num_seq_chunks, seq_partition=part, multiple_of=s.multiple_of,
        flop_model=flop_model(cfg.model) if part == "balanced" else None,
        # Middle stages get no input to read the length from; a static length spares the exchange.
        seq_len=cfg.training.seq_len if isinstance(part, str) else None,
    )


def seq_partition(cfg: JobConfig) -> SeqPartition:
    """The ``seq_partition`` of the recipe's Seq1F1B schedule: 'uniform', 'balanced' or a list."""
    return chunking(cfg).seq_partition


def chunk_lengths(cfg: JobConfig) -> list[int]:
    """Chunk lengths of ``training.seq_len`` (``[seq_len]`` for schedules without chunks)."""
    seq = cfg.training.seq_len
    if not schedule_info(cfg).seq_chunks:
        return [seq]
    return chunking(cfg).lengths(seq)


def resolve_path(cfg: JobConfig, path: str) -> str:
    """``path`` relative to ``job.dump_folder`` unless absolute."""
    return path if os.path.isabs(path) else os.path.join(cfg.job.dump_folder, path)
