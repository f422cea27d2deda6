"""Pipeline stages for torchtitan under tensor + sequence parallelism.

``SequencePipelineStage`` sizes every receive buffer for its unit's chunk length along
the sequence dimension. Under torchtitan's sequence parallelism (on whenever
``tensor_parallel_degree > 1``) the activations that cross stage boundaries are the
rank's *sequence shard*: the embedding's ``RowwiseParallel(output_layouts=Shard(1))``
and each block's ``SequenceParallel`` norms hand a ``[batch, chunk / tp, hidden]`` local
tensor to the next stage. Measured on PP=2 x TP=2, chunks of 32 tokens: stage 0 sends
``[1, 16, 256]``, a full-chunk buffer is ``[1, 32, 256]``; gloo accepts the short message
and the next stage's all-gather then yields 64 tokens against 32 positions (RoPE fails).
:class:`SeqShardedPipelineStage` sizes the buffers for the shard instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ... import _compat
from ...stage import SequencePipelineStage

__all__ = ["SeqShardedPipelineStage", "stage_class"]


class SeqShardedPipelineStage(SequencePipelineStage):
    """A ``SequencePipelineStage`` whose activations are sharded ``seq_shards`` ways along the sequence."""

    seq_shards = 1

    # The chunk-exactness check (pipelining_seq.stage_check) concatenates a stage's chunk
    # inputs into the whole sequence. Here each rank holds only its sequence shard of every
    # chunk, and those shards do not concatenate to the rank's shard of the whole sequence,
    # so the check cannot run on these stages: it stays detached (on every rank of the
    # pipeline alike, so the verdict's collective is skipped everywhere). TP + SP losses are
    # checked against torchtitan's own schedule instead (tests/distributed/test_torchtitan_e2e.py).
    @property
    def _chunk_check(self) -> None:
        return None

    @_chunk_check.setter
    def _chunk_check(self, value: Any) -> None:
        pass

    def _fit_buffers(self, infos: Sequence[Any], unit: int) -> None:
        if not self._lengths:
            return
        d = self.activation_seq_dim
        length = self._lengths[unit % self._n_chunks]
        if length % self.seq_shards:
            raise ValueError(
                f"chunk length {length} is not divisible by the {self.seq_shards} sequence-parallel "
                "ranks: choose chunk lengths divisible by --parallelism.tensor_parallel_degree"
            )
        local = length // self.seq_shards
        for info in infos:
            buf = getattr(info, "buffer", None)
            if not isinstance(info, _compat.RecvInfo) or buf is None or buf.dim() <= d:
                continue
            if buf.shape[d] != local:
                shape = list(buf.shape)
                shape[d] = local
                info.buffer = torch.empty(shape, dtype=buf.dtype, device=buf.device).requires_grad_(
                    buf.requires_grad
                )


def stage_class(seq_shards: int) -> type[SequencePipelineStage]:
    """The stage class torchtitan should build: sharded buffers when ``seq_shards > 1``."""
    if seq_shards <= 1:
        return SequencePipelineStage
    return type(f"SeqShardedPipelineStage_{seq_shards}", (SeqShardedPipelineStage,), {"seq_shards": seq_shards})
