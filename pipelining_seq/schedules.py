"""ScheduleSeq1F1B: sequence-level 1F1B on torch.distributed.pipelining.

A drop-in for ``Schedule1F1B``: ``step(x, target=y, losses=losses)`` takes whole
batches, cuts them into ``n_microbatches`` along dim 0 and each micro-batch into
``n_seq_chunks`` along ``seq_dim``, and runs the units in Seq1F1B order (see
:mod:`pipelining_seq.schedule_ir`).

Loss weighting. The loss function is called once per unit, on the chunk's outputs and
targets (:mod:`pipelining_seq.losses`). Two modes:

``loss_reduction="mean"`` (the default when ``scale_grads=True``: a per-token mean such
as ``cross_entropy``). Chunk j's loss is weighted by its share of the micro-batch's
counted targets: with integer targets, the number of targets ``!= ignore_index`` in
chunk j over the micro-batch's number (``ignore_index=-100`` by default, as in
``F.cross_entropy``; prompt masking and padding are exact); with other targets, or when
no target is ignored, ``len_j / seq_len``. The weighted chunk losses then sum to the
micro-batch's mean over counted targets for any chunk lengths and any masking,
gradients are divided by ``n_microbatches`` at the end, and ``losses`` receives one
entry per micro-batch equal to what ``Schedule1F1B`` reports. A chunk with no counted
target adds nothing; a micro-batch with none gives what the loss function gives on it
(NaN for ``cross_entropy``), as under ``Schedule1F1B``. This is exact for a loss that is
a mean over counted targets; a mean of something else (a per-sequence mean, a mean
with per-class weights) is not a weighted sum of chunk means and needs ``"sum"`` mode.

``loss_reduction="sum"`` (the default when ``scale_grads=False``: a loss that adds over
tokens, such as ``cross_entropy(reduction="sum")`` or torchtitan's
``sum / global_tokens``). Chunk losses are used as they are, gradients are not
rescaled, and each micro-batch's reported loss is the sum of its chunks' losses, again
what ``Schedule1F1B`` reports. Masked targets need nothing special here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.profiler import record_function

from . import _compat, p2p, registry, schedule_ir, stage_check
from .chunking import ChunkingConfig
from .partition import SeqPartition
from .seq_units import SeqChunkedSchedule
from .stage import SequencePipelineStage

__all__ = ["ScheduleSeq1F1B"]

logger = logging.getLogger(__name__)


@_compat.check_overrides
class ScheduleSeq1F1B(SeqChunkedSchedule, PipelineScheduleSingle):
    """Seq1F1B: 1F1B over (micro-batch, sequence-chunk) units.

    Args:
        stage: a :class:`SequencePipelineStage` (a plain ``PipelineStage`` works only
            with ``n_seq_chunks=1``).
        n_microbatches: micro-batches per step, split along dim 0 as in ``Schedule1F1B``.
        loss_fn: ``loss_fn(output, target)``, called per unit on the last stage.
        n_seq_chunks: chunks per micro-batch along ``seq_dim``.
        seq_partition: ``"uniform"``, a list of chunk lengths summing to the sequence
            length (e.g. from :func:`balanced_partition`), or a callable
            ``seq_len -> lengths``.
        seq_dim: sequence dimension of the inputs and targets given to ``step``.
        scale_grads: divide gradients by ``n_microbatches`` at the end of the step.
        seq_len: the sequence length, for stages that receive no input tensors when
            ``seq_partition`` is not an explicit list. If omitted, the first stage sends
            the chunk lengths down the pipeline at the start of every step.
        loss_reduction: ``"mean"`` or ``"sum"``; how chunk losses combine (module docs).
            Defaults to ``"mean"`` if ``scale_grads`` else ``"sum"``.
        ignore_index: target value that does not count in ``"mean"`` mode (integer
            targets); None counts every target. Must match the loss function's.
        early_recv: post each forward's activation receive one unit ahead, so the
            transfer overlaps the current unit's compute. Seq1F1B has k times as many
            receives as 1F1B, and a receive posted after its data arrived costs a few
            milliseconds on gloo. Default: on for gloo process groups, off otherwise
            (NCCL enqueues receives on its stream in order, where posting early buys
            nothing).
        chunking: the chunking settings as one
            :class:`~pipelining_seq.ChunkingConfig` instead of the keywords
            ``n_seq_chunks`` ... ``ignore_index`` (pass one or the other).
        verify_chunking: on the first training step and the first eval, check that the
            stage's chunked forwards of micro-batch 0 give the outputs of one
            whole-sequence forward of the same inputs, and raise ``ContractError`` on
            every rank before the step returns if not (:mod:`pipelining_seq.chunk_check`).
            One extra no-grad forward of one micro-batch per stage, once; nothing later.
    """

    def __init__(
        self,
        stage: Any,
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        n_seq_chunks: int | None = None,
        seq_partition: SeqPartition = "uniform",
        seq_dim: int = 1,
        scale_grads: bool = True,
        seq_len: int | None = None,
        loss_reduction: Literal["mean", "sum"] | None = None,
        early_recv: bool | None = None,
        ignore_index: int | None = -100,
        args_chunk_spec: Any = None,
        kwargs_chunk_spec: Any = None,
        output_merge_spec: Any = None,
        chunking: ChunkingConfig | None = None,
        verify_chunking: bool = True,
    ) -> None:
        units = self._init_units(
            "ScheduleSeq1F1B", n_microbatches, chunking, scale_grads, n_seq_chunks=n_seq_chunks,
            seq_partition=seq_partition, seq_dim=seq_dim, seq_len=seq_len, loss_reduction=loss_reduction,
            ignore_index=ignore_index,
        )
        n_seq_chunks = units.n_seq_chunks
        registry.check_admissible("Seq1F1B", pp=stage.num_stages, n_microbatches=n_microbatches,
                                  n_seq_chunks=n_seq_chunks, owner="ScheduleSeq1F1B")
        stage_check.setup("ScheduleSeq1F1B", [stage], n_seq_chunks=n_seq_chunks, enabled=verify_chunking)
        if n_seq_chunks > 1 and not isinstance(stage, SequencePipelineStage):
            raise TypeError(
                f"ScheduleSeq1F1B(n_seq_chunks={n_seq_chunks}) needs a SequencePipelineStage "
                f"(got {type(stage).__name__}): build the stage with "
                "pipelining_seq.SequencePipelineStage(...), same arguments"
            )
        self._early_recv = early_recv
        self._fwd_recv_work: dict[int, list] = {}
        super().__init__(
            stage,
            n_microbatches * n_seq_chunks,  # the base class counts units
            loss_fn,
            args_chunk_spec=args_chunk_spec,
            kwargs_chunk_spec=kwargs_chunk_spec,
            output_merge_spec=output_merge_spec,
            scale_grads=scale_grads,
        )

    def _get_pipeline_order(self) -> dict[int, list]:
        """torch's ``_Action`` IR of every rank, unit ids ``u = microbatch * k + chunk``."""
        return schedule_ir.pipeline_order(self._num_stages, self._units.n_microbatches, self._units.n_seq_chunks)

    # ------------------------------------------------------------------ step path
    def _seq_stages(self) -> list:
        return [self._stage]

    def _length_peers(self) -> tuple[int | None, int | None, str]:
        stage = self._stage
        return (
            None if stage.is_first else _compat.peer_global_rank(stage, stage.stage_index - 1),
            None if stage.is_last else _compat.peer_global_rank(stage, stage.stage_index + 1),
            f"stage {stage.stage_index}",
        )

    def _run_units(self, arg_units, kwarg_units, target_units, losses, return_outputs, loss_kwargs) -> None:
        self._step_microbatches(arg_units, kwarg_units, target_units, losses, return_outputs, loss_kwargs)

    # ------------------------------------------------------------------- execution
    def _step_microbatches(
        self,
        arg_mbs: list | None = None,
        kwarg_mbs: list | None = None,
        target_mbs: list | None = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Run the units of one step; ``arg_mbs`` etc. hold one entry per unit."""
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        _compat.initialize_stage(
            self, arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs is not None else None, loss_kwargs
        )
        if self._has_backward:
            self._run_1f1b(arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
        else:
            with torch.no_grad():
                self._run_forward_only(arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
        self._update_losses(self._stage, losses)
        if self._has_backward:
            self._stage.perform_reduce_grad(self._units.n_microbatches if self.scale_grads else 1)

    def _forward(self, u, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs):
        stage = self._stage
        with record_function(f"PP:{stage.stage_index}F{u}"):
            output = stage.forward_one_chunk(u, arg_mbs[u], kwarg_mbs[u], save_forward_output=return_outputs)
        self._maybe_compute_loss(stage, output, target_mbs, u, loss_kwargs)

    def _backward(self, u, last_backward):
        stage = self._stage
        with record_function(f"PP:{stage.stage_index}B{u}"):
            stage.backward_one_chunk(u, loss=self._maybe_get_loss(stage, u), last_backward=last_backward)

    def _run_forward_only(self, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs):
        stage = self._stage
        sends: list = []
        for u in range(self.n_units):
            p2p.wait(p2p.post(stage.get_fwd_recv_ops(u), desc="fwd_recv", unit=u))
            self._forward(u, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
            sends.append(p2p.post(stage.get_fwd_send_ops(u), desc="fwd_send", unit=u))
        for work in sends:
            p2p.wait(work)

    def _use_early_recv(self) -> bool:
        if self._early_recv is not None:
            return self._early_recv
        group = self._stage.group or _compat.default_group()
        return dist.get_backend(group) == "gloo"

    def _post_fwd_recv(self, u: int) -> None:
        if u < self.n_units and u not in self._fwd_recv_work:
            self._fwd_recv_work[u] = p2p.post(self._stage.get_fwd_recv_ops(u), desc="fwd_recv", unit=u)

    def _wait_fwd_recv(self, u: int) -> None:
        self._post_fwd_recv(u)
        p2p.wait(self._fwd_recv_work.pop(u))

    def _run_1f1b(self, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs):
        # Same structure as Schedule1F1B._step_microbatches (fused send/recv pairs), with
        # the Seq1F1B warm-up and backward order. Counted as torch counts: warm-up
        # includes the forward that the steady state's first backward follows.
        stage = self._stage
        n = self.n_units
        early = self._use_early_recv()
        self._fwd_recv_work.clear()
        bwd_order = schedule_ir.backward_unit_order(self._units.n_microbatches, self._units.n_seq_chunks)
        warmup = min(
            n,
            schedule_ir.warmup_units(stage.num_stages, stage.stage_index, self._units.n_microbatches, self._units.n_seq_chunks) + 1,
        )
        fwd = bwd = 0
        send_work: list = []
        fwd_sends: list = []
        for _ in range(warmup):
            self._wait_fwd_recv(fwd)
            if early:
                self._post_fwd_recv(fwd + 1)
            self._forward(fwd, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
            p2p.wait(send_work)
            fwd_sends = stage.get_fwd_send_ops(fwd)
            if fwd != warmup - 1:
                send_work = p2p.post(fwd_sends, desc="fwd_send", unit=fwd)
            fwd += 1

        while True:
            u = bwd_order[bwd]
            works = p2p.post(fwd_sends + stage.get_bwd_recv_ops(u), desc="fwd_send_bwd_recv", unit=u)
            if early:
                self._post_fwd_recv(fwd)
            p2p.wait(works)
            self._backward(u, last_backward=bwd == n - 1)
            bwd_sends = stage.get_bwd_send_ops(u)
            bwd += 1
            if fwd == n:
                break
            if early:
                p2p.wait(p2p.post(bwd_sends, desc="bwd_send", unit=u))
                self._wait_fwd_recv(fwd)
            else:
                fwd_recvs = stage.get_fwd_recv_ops(fwd)
                p2p.wait(p2p.post(bwd_sends + fwd_recvs, desc="bwd_send_fwd_recv", unit=fwd))
            self._forward(fwd, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
            fwd_sends = stage.get_fwd_send_ops(fwd)
            fwd += 1

        send_work = p2p.post(bwd_sends, desc="bwd_send", unit=u)
        while bwd < n:
            u = bwd_order[bwd]
            p2p.wait(p2p.post(stage.get_bwd_recv_ops(u), desc="bwd_recv", unit=u))
            self._backward(u, last_backward=bwd == n - 1)
            p2p.wait(send_work)
            send_work = p2p.post(stage.get_bwd_send_ops(u), desc="bwd_send", unit=u)
            bwd += 1
        p2p.wait(send_work)
