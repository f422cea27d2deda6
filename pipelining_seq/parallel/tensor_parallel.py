"""Tensor (and sequence) parallelism for one pipeline stage of the reference GPT.

Megatron's layout, written with DTensor's ``parallelize_module``: Q/K/V and the MLP's
input projections are column-parallel (each rank owns whole heads / a slice of the
FFN), the attention output and MLP output projections row-parallel. The attention
reshapes with ``-1`` heads, so it runs on the local heads and the Seq1F1B K/V cache
holds only those.

What crosses a pipeline boundary is always a plain tensor holding the whole chunk,
identical on every tensor-parallel rank. ``SequencePipelineStage`` resizes receive
buffers per chunk; DTensor stage I/O would carry chunk 0's metadata for every unit.

With sequence parallelism the residual stream inside a stage is a plain tensor holding
this rank's slice of the chunk along the sequence: the norms run on ``1/tp`` of the
tokens, and each column-parallel projection all-gathers its input. The first block of
a stage that received activations slices them (no communication), the last block of
a non-final stage all-gathers its output before the send. As in Megatron, the
column-parallel projections then save only their rank's slice of the gathered input
and gather it again in backward (torch's ``input_reshard``); otherwise every layer
would keep two whole-chunk copies of the hidden state per unit in flight.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.input_reshard import input_reshard

__all__ = ["COLWISE", "ROWWISE", "apply_tensor_parallel", "tp_shard_dim"]

logger = logging.getLogger(__name__)

# Names inside a transformer block. The planner reads the same tables, so the bytes it
# predicts follow the plan that runs.
COLWISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROWWISE = ("attention.wo", "feed_forward.w2")


def tp_shard_dim(param_name: str) -> int | None:
    """The dimension along which tensor parallelism shards a parameter (None: replicated)."""
    module = param_name.rsplit(".", 1)[0]
    if module in ("tok_embeddings", "output"):
        return 0  # vocab rows
    parts = module.split(".")
    if len(parts) >= 3 and parts[0] == "layers":
        inner = ".".join(parts[2:])
        if inner in COLWISE:
            return 0
        if inner in ROWWISE:
            return 1
    return None


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    for part in name.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _block_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, object]:
    seq = Shard(1)
    plan: dict[str, object] = {}
    for name in COLWISE:
        if _submodule(block, name) is not None:  # w3 exists only with SwiGLU
            plan[name] = ColwiseParallel()
    for name in ROWWISE:
        plan[name] = RowwiseParallel(output_layouts=seq if sequence_parallel else Replicate())
    if sequence_parallel:
        for norm, sub in (("attention_norm", "attention"), ("ffn_norm", "feed_forward")):
            plan[norm] = SequenceParallel()
            plan[sub] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
    return plan


def apply_tensor_parallel(module: nn.Module, *, tp_mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Shard ``module`` (a GPT stage from ``split_stage``) over ``tp_mesh`` in place."""
    blocks = list(module.layers.items())
    if not blocks:
        raise ValueError("apply_tensor_parallel: the stage holds no transformer block")
    sp = sequence_parallel
    plan: dict[str, object] = {}
    if module.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate()
        )
    if module.norm is not None and sp:
        plan["norm"] = SequenceParallel()
    if module.output is not None:
        plan["output"] = ColwiseParallel(
            input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate()
        )
    for _, block in blocks:
        parallelize_module(block, tp_mesh, _block_plan(block, sp))
        if sp:
            for name in COLWISE:
                linear = _submodule(block, name)
                if linear is not None:
                    input_reshard(linear, tp_mesh, input_reshard_dim=1)
    if sp:
        # Stage boundaries carry whole chunks; the residual stream inside is sharded.
        first, last = blocks[0][0], blocks[-1][0]
        slice_in = module.tok_embeddings is None
        gather_out = module.norm is None
        boundary_in = dict(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),))
        boundary_out = dict(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),))
        if slice_in and gather_out and first == last:
            plan[f"layers.{first}"] = PrepareModuleInputOutput(
                **boundary_in, use_local_input=True, **boundary_out, use_local_output=True
            )
        else:
            if slice_in:
                plan[f"layers.{first}"] = PrepareModuleInput(**boundary_in, use_local_output=True)
            if gather_out:
                plan[f"layers.{last}"] = PrepareModuleOutput(**boundary_out, use_local_output=True)
    parallelize_module(module, tp_mesh, plan)
    if sp and module.output is not None:
        input_reshard(module.output, tp_mesh, input_reshard_dim=1)
    logger.info(
        "tensor parallel over %d ranks (sequence parallel: %s) on %d blocks",
        tp_mesh.size(), sp, len(blocks),
    )
    return module
