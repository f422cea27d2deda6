"""SequencePipelineStage: a PipelineStage that runs (micro-batch, chunk) units.

Differences from torch's ``PipelineStage`` (same constructor, plus ``activation_seq_dim``):

* each unit gets receive and gradient buffers sized for its own chunk length (torch
  sizes every buffer from unit 0, and gloo then silently accepts short messages);
* ``forward_one_chunk``/``backward_one_chunk`` publish the unit's chunk context
  (micro-batch, chunk, offset, length) to the layers, backward included so that
  activation-checkpoint recomputation sees the same chunk;
* backwards must come in reverse chunk order within a micro-batch (enforced);
* in a step cut into more than one chunk, attention kernels not called by
  ``ChunkedCausalAttention`` raise ``ContractError`` (:mod:`pipelining_seq.guard`; watched:
  the first forward of each step and every forward of a chunk length not seen before);
* a micro-batch's K/V cache is freed once its chunk 0 has run backward (with a split
  backward: once its last weight pass ran), or after its last chunk's forward when there
  is no backward; nothing stays cached after a step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.pipelining import PipelineStage

from . import _compat
from .context import ChunkContext, ContractError, KVCache, chunk_context, current_chunk
from .guard import chunked_unit
from .weight_grad import WeightGradStore, unsupported_reason

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
        self._next_w_chunk: dict[int, int] = {}
        self._split_pending: dict[int, int] = {}  # per micro-batch: I done, W not yet
        self._unit: int | None = None
        # Chunk lengths whose forward ran under the attention guard (see _guarded).
        self._guarded_lengths: set[int] = set()
        self._compiled = False
        self._wgrad_store: WeightGradStore | None = None
        # The chunk-exactness check's recorder (pipelining_seq.chunk_check), set by the schedule.
        self._chunk_check: Any = None

    # ------------------------------------------------------------------ configuration
    def configure_seq_chunks(self, *, n_microbatches: int, chunk_lengths: Sequence[int]) -> None:
        """Set the chunking of the coming step (the schedule calls this every step)."""
        self._n_chunks = len(chunk_lengths)
        self._lengths = list(chunk_lengths)
        self._offsets = [sum(self._lengths[:j]) for j in range(self._n_chunks)]
        self._n_microbatches = n_microbatches
        self._compiled = _compat.has_compiled_module(self.submod)
        if self._chunk_check is not None:
            self._chunk_check.arm(kind="step" if self.has_backward else "eval", lengths=self._lengths)

    def use_weight_grad_store(self, enabled: bool = True) -> bool:
        """Split backwards (I, W) with a weight-gradient store (:mod:`pipelining_seq.weight_grad`).

        I then computes the input gradients (and the gradients of parameters outside
        ``nn.Linear`` layers) in one autograd call that frees the unit's graph; W runs the
        deferred ``nn.Linear`` weight products. Works for any schedule that calls
        ``backward_one_chunk(full_backward=False)`` and ``backward_weight_one_chunk``
        (torch's zero-bubble schedules too). Returns whether the store is in use: False
        when the stage has no trainable ``nn.Linear``, or is wrapped in DDP/FSDP or
        compiled (then torch's own split backward runs).
        """
        if self._wgrad_store is not None:
            self._wgrad_store.detach()
            self._wgrad_store = None
            self.dw_builder = None
        if not enabled or unsupported_reason(self.submod) is not None:
            return False
        store = WeightGradStore()
        if store.attach(self.submod) == 0:
            return False
        self._wgrad_store = store
        self.dw_builder = store.take
        return True

    @property
    def weight_grad_store(self) -> WeightGradStore | None:
        """The store in use (:meth:`use_weight_grad_store`), else None."""
        return self._wgrad_store

    def _capture_weight_grads(self):
        store = self._wgrad_store
        return store.capture() if store is not None else contextlib.nullcontext()

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
    def _where(self, ctx: ChunkContext, what: str) -> str:
        return f"stage {self.stage_index}'s {what} of micro-batch {ctx.microbatch}, chunk {ctx.chunk}"

    def _guarded(self, unit: int, ctx: ChunkContext) -> int:
        """How many chunks the guard should assume for this forward (1 = no guard).

        A TorchFunctionMode costs a Python call per torch call, so the guard watches the
        first forward of every step and every forward whose chunk length it has not seen
        yet (a model that attends by itself does so on every such unit); the other units,
        and the backward recomputation of forwards already watched, run without it. A
        stage with compiled modules is watched on every forward: torch.compile traces the
        mode into the graph (no per-call cost) and keys its graphs on whether a mode is
        pushed, so switching it on and off would double them.
        """
        if ctx.n_chunks <= 1:
            return 1
        if not self._compiled and unit != 0 and ctx.length in self._guarded_lengths:
            return 1
        self._guarded_lengths.add(ctx.length)
        return ctx.n_chunks

    def forward_maybe_with_nosync(self, *args: Any, **kwargs: Any) -> Any:
        # torch's forward_one_chunk calls this with the unit's composite inputs; the
        # chunk-exactness check records micro-batch 0's here on its first step and eval.
        check = self._chunk_check
        if check is None or not check.wants(current_chunk()):
            return super().forward_maybe_with_nosync(*args, **kwargs)
        return check.record(lambda: super(SequencePipelineStage, self).forward_maybe_with_nosync(*args, **kwargs),
                            args, kwargs)

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
            guard = self._guarded(fwd_chunk_id, ctx)
            with chunk_context(ctx), chunked_unit(n_chunks=guard, where=self._where(ctx, "forward")):
                out = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        except RuntimeError as e:
            # torch wraps forward errors in a generic RuntimeError; a broken contract is
            # the user's to see as such.
            if isinstance(e.__cause__, ContractError):
                raise e.__cause__ from None
            raise
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
            with self._capture_weight_grads():
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
            with chunk_context(ctx), self._capture_weight_grads():
                out = super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        finally:
            self._unit = None
        self._next_bwd_chunk[ctx.microbatch] = ctx.chunk - 1
        if full_backward:
            if ctx.chunk == 0:
                self.kv_cache.drop(ctx.microbatch)
        else:
            self._split_pending[ctx.microbatch] = self._split_pending.get(ctx.microbatch, 0) + 1
        return out

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward=False):
        """The weight pass of a unit whose backward was split (``full_backward=False``).

        Runs under the unit's chunk context (activation-checkpoint recomputation). On the
        first stage torch runs the whole backward here, K/V gradient relay included, so
        there the weight passes must also come in reverse chunk order. The micro-batch's
        K/V cache is freed after its last weight pass.
        """
        if not self._lengths or not self.has_backward:
            return super().backward_weight_one_chunk(bwd_chunk_id, last_backward)
        ctx = self.unit_context(bwd_chunk_id, recompute=True)
        if self.is_first:
            expected = self._next_w_chunk.get(ctx.microbatch, ctx.n_chunks - 1)
            if ctx.chunk != expected:
                raise RuntimeError(
                    f"stage {self.stage_index}: weight pass of unit {bwd_chunk_id} (micro-batch "
                    f"{ctx.microbatch}, chunk {ctx.chunk}) out of order; expected chunk {expected}. "
                    "On the first stage the weight pass runs the whole backward, K/V gradient "
                    "relay included, so it must go in reverse chunk order"
                )
        self._unit = bwd_chunk_id
        try:
            with chunk_context(ctx):
                out = super().backward_weight_one_chunk(bwd_chunk_id, last_backward)
        finally:
            self._unit = None
        self._next_w_chunk[ctx.microbatch] = ctx.chunk - 1
        left = self._split_pending.get(ctx.microbatch, 0) - 1
        self._split_pending[ctx.microbatch] = left
        if left == 0 and self._next_bwd_chunk.get(ctx.microbatch) == -1:
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
        if self._wgrad_store is not None:
            self.dw_runner.clear()  # W runners of an unfinished step hold its tensors
            self._wgrad_store.clear()
        self._next_bwd_chunk.clear()
        self._next_w_chunk.clear()
        self._split_pending.clear()
