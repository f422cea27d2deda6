"""Settings derived from a recipe, each computed in one place.

The training loop, validation, checkpoints, the launcher and the planner all ask these
functions instead of re-deriving a setting from the raw fields: the schedule (resolved by
:mod:`pipelining_seq.placement`), the world size, micro-batches, which rank holds which
stage, the stage layout a checkpoint must match, and the Seq1F1B chunk lengths.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from .. import placement
from ..flops import balanced_partition_for
from ..models.gpt import stage_layer_ranges
from ..partition import SeqPartition, resolve_partition
from .config import ConfigError, JobConfig

__all__ = [
    "chunk_lengths",
    "n_microbatches",
    "pipeline_layout",
    "resolve_path",
    "schedule_info",
    "seq_partition",
    "stage_ranks",
    "stages_per_rank",
    "world_size",
]


def schedule_info(cfg: JobConfig) -> placement.ScheduleInfo:
    """The recipe's schedule (any capitalisation); ConfigError naming the knob if unknown."""
    try:
        return placement.resolve_schedule(cfg.parallelism.pipeline_parallel_schedule)
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
        return placement.stages_per_rank(info, cfg.parallelism.pipeline_parallel_stages_per_rank)
    except ValueError as e:
        raise ConfigError(f"parallelism.pipeline_parallel_stages_per_rank: {e}") from None


def stage_ranks(cfg: JobConfig) -> list[int]:
    """Pipeline rank (within the pp group) holding each stage."""
    return placement.stage_ranks(
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


def seq_partition(cfg: JobConfig) -> SeqPartition:
    """The ``seq_partition`` argument of the recipe's Seq1F1B schedule: 'uniform', a list,
    or (``balanced``) a callable ``seq_len -> lengths`` over the recipe's model."""
    s, g = cfg.seq1f1b, cfg.model
    if isinstance(s.partition, str) and s.partition == "balanced":
        return functools.partial(balanced_partition_for, g, n_chunks=s.num_seq_chunks, multiple_of=s.multiple_of)
    return s.partition if isinstance(s.partition, str) else list(s.partition)


def chunk_lengths(cfg: JobConfig) -> list[int]:
    """Chunk lengths of ``training.seq_len`` (``[seq_len]`` for schedules without chunks)."""
    seq = cfg.training.seq_len
    if not schedule_info(cfg).seq_chunks:
        return [seq]
    return resolve_partition(seq_partition(cfg), seq, cfg.seq1f1b.num_seq_chunks)


def resolve_path(cfg: JobConfig, path: str) -> str:
    """``path`` relative to ``job.dump_folder`` unless absolute."""
    return path if os.path.isabs(path) else os.path.join(cfg.job.dump_folder, path)
