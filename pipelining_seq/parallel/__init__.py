"""Seq1F1B composed with FSDP2 and DTensor tensor parallelism on one device mesh.

``build_mesh`` makes the ``(pp, dp_shard, tp)`` mesh; ``parallelize_stage`` turns one
pipeline stage of the reference GPT into its tensor-parallel, FSDP-sharded form. Build
the pipeline stage afterwards, on the ``pp`` sub-mesh's group::

    mesh = build_mesh(pp=2, dp_shard=2, tp=2, device_type="cuda")
    part = split_stage(model, mesh["pp"].get_local_rank(), 2)
    part = parallelize_stage(part, mesh=mesh, mixed_precision=True, sequence_parallel=True)
    stage = SequencePipelineStage(part, ..., group=mesh["pp"].get_group())
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .fsdp import apply_fsdp, mixed_precision_policy
from .mesh import MESH_DIM_NAMES, build_mesh, validate_layout
from .tensor_parallel import apply_tensor_parallel, tp_shard_dim

__all__ = [
    "MESH_DIM_NAMES",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "mixed_precision_policy",
    "parallelize_stage",
    "tp_shard_dim",
    "validate_layout",
]

logger = logging.getLogger(__name__)


def parallelize_stage(
    module: nn.Module, *, mesh: DeviceMesh, mixed_precision: bool, sequence_parallel: bool = False
) -> nn.Module:
    """Apply tensor parallelism, then FSDP2, to a GPT pipeline stage; returns it.

    Args:
        module: one stage of :class:`pipelining_seq.models.GPT` (from ``split_stage``),
            on the mesh's device.
        mesh: a mesh with dimensions ``("pp", "dp_shard", "tp")`` (:func:`build_mesh`).
        mixed_precision: bf16 parameters and compute, fp32 gradient reduction, through
            FSDP2's ``MixedPrecisionPolicy``. FSDP is then applied even on a single
            data-parallel rank, because it owns the bf16 cast.
        sequence_parallel: shard norms and the residual stream along the sequence over
            the ``tp`` ranks (every chunk length must divide by the TP degree).

    A size-1 ``tp`` dimension is skipped, as is a size-1 ``dp_shard`` dimension when
    ``mixed_precision`` is off.
    """
    missing = [n for n in MESH_DIM_NAMES if n not in (mesh.mesh_dim_names or ())]
    if missing:
        raise ValueError(
            f"parallelize_stage: mesh dimensions {mesh.mesh_dim_names} lack {missing}: "
            "build it with pipelining_seq.parallel.build_mesh"
        )
    tp, dp = mesh["tp"].size(), mesh["dp_shard"].size()
    cfg = getattr(module, "config", None)
    if cfg is not None:
        validate_layout(
            pp=mesh["pp"].size(), dp_shard=dp, tp=tp, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads
        )
    if tp > 1:
        apply_tensor_parallel(module, tp_mesh=mesh["tp"], sequence_parallel=sequence_parallel)
    elif sequence_parallel:
        logger.info("sequence_parallel ignored: tensor_parallel_degree is 1")
    if dp > 1 or mixed_precision:
        apply_fsdp(module, dp_mesh=mesh["dp_shard"], mixed_precision=mixed_precision)
    return module
