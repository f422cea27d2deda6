"""FSDP2 for one pipeline stage: one parameter group per block plus the stage root.

With pipelining a stage runs forward and backward once per unit (m*k times per step
under Seq1F1B). Parameters therefore stay unsharded from the first forward of a step to
the gradient reduction at its end (``reshard_after_forward=False``): one all-gather per
group per step instead of one per unit. torch's stage turns gradient sync off for
every unit's backward and reduces once in ``perform_reduce_grad``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = ["apply_fsdp", "mixed_precision_policy"]

logger = logging.getLogger(__name__)


def mixed_precision_policy() -> MixedPrecisionPolicy:
    """bf16 compute and all-gathers, fp32 gradient reduction (and fp32 sharded master)."""
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(
    module: nn.Module, *, dp_mesh: DeviceMesh, mixed_precision: bool, reshard_after_forward: bool = False
) -> nn.Module:
    """``fully_shard`` every block of ``module.layers`` and then ``module`` itself.

    ``reshard_after_forward=True`` is there for comparison only: under pipelining it
    all-gathers every group once per unit forward and once per unit backward.
    """
    kwargs = dict(mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    if mixed_precision:
        kwargs["mp_policy"] = mixed_precision_policy()
    for block in module.layers.values():
        fully_shard(block, **kwargs)
    # The root group holds what is left: embeddings, final norm, output projection.
    fully_shard(module, **kwargs)
    logger.info(
        "FSDP2 over %d ranks on %d blocks + root (mixed precision: %s)",
        dp_mesh.size(), len(module.layers), mixed_precision,
    )
    return module
