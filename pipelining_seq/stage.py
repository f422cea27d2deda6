"""SequencePipelineStage: a PipelineStage that runs (micro-batch, chunk) units.

Differences from torch's ``PipelineStage`` (same constructor, plus ``activation_seq_dim``):

* each unit gets receive and gradient buffers sized for its own chunk length (torch
  sizes every buffer from unit 0, and gloo then silently accepts short messages);
* ``forward_one_chunk``/``backward_one_chunk`` publish the unit's chunk context
  (micro-batch, chunk, offset, length) to the layers, backward included so that
  activation-checkpoint recomputation sees the same chunk;
* backwards must come in reverse chunk order within a micro-batch (enforced);
* a micro-batch's K/V cache is freed once its chunk 0 has run backward, or after its
  last chunk's forward when there is no backward; nothing stays cached after a step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.pipelining import PipelineStage

from . import _compat
from .context import ChunkContext, KVCache, chunk_context

__all__ = ["SequencePipelineStage"]

logger = logging.getLogger(__name__)


@_compat.check_overrides
class SequencePipelineStage(PipelineStage):
    """A pipeline stage whose micro-batches are split into sequence chunks.

    Takes the same arguments as :class:`torch.distributed.pipelining.PipelineStage`.

    Args:
        activation_seq_dim: the sequence dimension of every activation this stage
            receives or sends (``[batch, seq, hidden]`` → 1).
    """

    def __init__(self, *args: Any, activation_seq_dim: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.activation_seq_dim = activation_seq_dim
        self.kv_cache = KVCache()
        self._n_chunks = 1
        self._lengths: list[int] = []
        self._offsets: list[int] = []
        self._next_bwd_chunk: dict[int, int] = {}
        self._unit: int | None = None

    # ------------------------------------------------------------------ configuration
    def configure_seq_chunks(self, *, n_microbatches: int, chunk_lengths: Sequence[int]) -> None:
        """Set the chunking of the coming step (the schedule calls this every step)."""
        self._n_chunks = len(chunk_lengths)
        self._lengths = list(chunk_lengths)
        self._offsets = [sum(self._lengths[:j]) for j in range(self._n_chunks)]
        self._n_microbatches = n_microbatches

    def unit_context(self, unit: int, *, recompute: bool = False) -> ChunkContext:
        mb, j = divmod(unit, self._n_chunks)
        return ChunkContext(
            microbatch=mb, chunk=j, n_chunks=self._n_chunks, offset=self._offsets[j],
            length=self._lengths[j], cache=self.kv_cache, recompute=recompute,
        )

    # ------------------------------------------------------------ per-unit buffers
    def _fit_buffers(self, infos: Sequence[Any], unit: int) -> None:
        if not self._lengths:
            return
        d = self.activation_seq_dim
        length = self._lengths[unit % self._n_chunks]
        for info in infos:
            buf = getattr(info, "buffer", None)
            if not isinstance(info, _compat.RecvInfo) or buf is None or buf.dim() <= d:
                continue
            if buf.shape[d] != length:
                shape = list(buf.shape)
                shape[d] = length
                info.buffer = torch.empty(
                    shape, dtype=buf.dtype, device=buf.device
                ).requires_grad_(buf.requires_grad)

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        if not self.is_first:
            self._fit_buffers(self.args_recv_info[fwd_chunk_id], fwd_chunk_id)
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        if self.has_backward and not self.is_last:
            self._fit_buffers(self.grad_recv_info[bwd_chunk_id], bwd_chunk_id)
        return super().get_bwd_recv_ops(bwd_chunk_id)

    # The stock checks compare every unit with unit 0's metadata; chunks of different
    # lengths legitimately differ along the sequence dimension.
    def _validate_fwd_input(self, args, kwargs):  # torch 2.11
        if len(set(self._lengths)) <= 1:
            super()._validate_fwd_input(args, kwargs)

    def _validate_fwd_outputs(self, outputs):  # torch 2.11
        if len(set(self._lengths)) <= 1:
            super()._validate_fwd_outputs(outputs)

    def _validate_stage_tensors(self, desc, expected, actual):  # torch >= 2.13, DETAIL
        if self._unit is None or self._lengths[self._unit % self._n_chunks] == self._lengths[0]:
            super()._validate_stage_tensors(desc, expected, actual)

    # ------------------------------------------------------------------- execution
    def forward_one_chunk(
        self,
        fwd_chunk_id: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        save_forward_output: bool = True,
    ):
        if not self._lengths:
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        ctx = self.unit_context(fwd_chunk_id)
        self._unit = fwd_chunk_id
        try:
            with chunk_context(ctx):
                out = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        finally:
            self._unit = None
        if ctx.chunk == ctx.n_chunks - 1 and not (self.has_backward and torch.is_grad_enabled()):
            self.kv_cache.drop(ctx.microbatch)
        return out

    def backward_one_chunk(
        self,
        bwd_chunk_id: int,
        loss=None,
        full_backward: bool = True,
        last_backward=False,
    ):
        if not self._lengths or not self.has_backward:
            return super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        ctx = self.unit_context(bwd_chunk_id, recompute=True)
        expected = self._next_bwd_chunk.get(ctx.microbatch, ctx.n_chunks - 1)
        if ctx.chunk != expected:
            raise RuntimeError(
                f"stage {self.stage_index}: backward of unit {bwd_chunk_id} (micro-batch "
                f"{ctx.microbatch}, chunk {ctx.chunk}) out of order; expected chunk {expected}. "
                "Seq1F1B runs backwards in reverse chunk order within a micro-batch, because "
                "chunk j's K/V get gradient from every later chunk"
            )
        self._unit = bwd_chunk_id
        try:
            with chunk_context(ctx):
                out = super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        finally:
            self._unit = None
        self._next_bwd_chunk[ctx.microbatch] = ctx.chunk - 1
        if ctx.chunk == 0:
            self.kv_cache.drop(ctx.microbatch)
        return out

    def clear_runtime_states(self) -> None:
        super().clear_runtime_states()
        if len(self.kv_cache):
            logger.warning(
                "stage %s: dropping K/V cache of micro-batches %s left from an unfinished step",
                self.stage_index, self.kv_cache.microbatches(),
            )
        self.kv_cache.clear()
        self._next_bwd_chunk.clear()
