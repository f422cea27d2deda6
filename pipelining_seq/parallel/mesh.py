"""The device mesh of a Seq1F1B job, and the checks its degrees must pass.

Dimension names follow torchtitan: ``pp`` outermost, then ``dp_shard``, then ``tp``, so
the ranks of one tensor-parallel group are adjacent (one node in practice) and a
pipeline stage's FSDP group spans the nodes that hold the same stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MESH_DIM_NAMES", "build_mesh", "validate_layout"]

logger = logging.getLogger(__name__)

MESH_DIM_NAMES = ("pp", "dp_shard", "tp")


def validate_layout(
    *,
    pp: int,
    dp_shard: int,
    tp: int,
    world_size: int | None = None,
    n_layers: int | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    chunk_lengths: Sequence[int] | None = None,
    sequence_parallel: bool = False,
) -> None:
    """Raise ``ValueError`` naming the knob to change if the layout cannot run.

    Pure arithmetic: call it before any process group exists. Arguments left as None
    are not checked.
    """
    degrees = {
        "parallelism.pipeline_parallel_degree": pp,
        "parallelism.data_parallel_shard_degree": dp_shard,
        "parallelism.tensor_parallel_degree": tp,
    }
    for name, val in degrees.items():
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}={val!r} must be a positive integer")
    if world_size is not None and pp * dp_shard * tp != world_size:
        raise ValueError(
            f"pipeline_parallel_degree ({pp}) x data_parallel_shard_degree ({dp_shard}) x "
            f"tensor_parallel_degree ({tp}) = {pp * dp_shard * tp}, but the world size is "
            f"{world_size}: change the parallelism degrees or the number of processes so "
            "that they multiply to the world size"
        )
    if n_layers is not None and n_layers < pp:
        raise ValueError(
            f"model.n_layers={n_layers} cannot be split over pipeline_parallel_degree={pp} "
            "stages (each stage needs at least one layer): lower the pipeline degree or add layers"
        )
    if n_heads is not None and n_heads % tp:
        raise ValueError(
            f"model.n_heads={n_heads} is not divisible by tensor_parallel_degree={tp}: "
            "each tensor-parallel rank must hold whole heads; change one of them"
        )
    if n_kv_heads is not None and n_kv_heads % tp:
        raise ValueError(
            f"model.n_kv_heads={n_kv_heads} is not divisible by tensor_parallel_degree={tp}: "
            "each tensor-parallel rank must hold whole key/value heads; change one of them"
        )
    if sequence_parallel and tp > 1 and chunk_lengths is not None:
        bad = [s for s in chunk_lengths if s % tp]
        if bad:
            raise ValueError(
                f"sequence parallelism shards every chunk over tensor_parallel_degree={tp} "
                f"ranks, but chunk lengths {list(chunk_lengths)} include {bad}, not divisible "
                f"by {tp}: set seq1f1b.multiple_of to a multiple of {tp}, pick a sequence "
                "length / explicit partition whose chunks divide, or turn off "
                "parallelism.enable_sequence_parallel"
            )


def build_mesh(*, pp: int, dp_shard: int, tp: int, device_type: str) -> DeviceMesh:
    """A ``(pp, dp_shard, tp)`` mesh over the default process group (``pp`` outermost).

    Size-1 dimensions are kept, so ``mesh["tp"]`` etc. always exist.
    """
    world = dist.get_world_size() if dist.is_initialized() else None
    validate_layout(pp=pp, dp_shard=dp_shard, tp=tp, world_size=world)
    mesh = init_device_mesh(device_type, (pp, dp_shard, tp), mesh_dim_names=MESH_DIM_NAMES)
    logger.info("device mesh pp=%d x dp_shard=%d x tp=%d on %s", pp, dp_shard, tp, device_type)
    return mesh
