"""Seq1F1B schedules on torch's action-list runtime (``_PipelineScheduleRuntime``).

The base class here does what the interleaved and zero-bubble Seq1F1B schedules share:
whole batches → units (:class:`~pipelining_seq.seq_units.SeqUnits`), the per-unit loss
weighting, one loss per micro-batch in ``losses``, gradient scaling by the number of
micro-batches (torch's runtime would divide by its unit count), a forward-only order for
``eval()``, and the checks that must fail before any communication. A subclass supplies
the compute order (:mod:`pipelining_seq.schedule_ir_multi`); torch's runtime lowers it
(send/recv, FSDP unshard/reshard, grad reduction) and runs it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from . import _compat, agreement, chunk_check, schedule_ir_multi
from .partition import SeqPartition
from .seq_units import SeqChunkedSchedule, SeqUnits
from .stage import SequencePipelineStage

__all__ = ["SeqRuntimeSchedule"]

logger = logging.getLogger(__name__)


class SeqRuntimeSchedule(SeqChunkedSchedule, _compat.PipelineScheduleRuntime):
    """Base of the multi-stage-runtime Seq1F1B schedules (not used directly)."""

    name = "SeqRuntimeSchedule"

    def __init__(
        self,
        stages: Sequence[Any],
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        n_seq_chunks: int,
        seq_partition: SeqPartition = "uniform",
        seq_dim: int = 1,
        scale_grads: bool = True,
        seq_len: int | None = None,
        loss_reduction: Literal["mean", "sum"] | None = None,
        ignore_index: int | None = -100,
        args_chunk_spec: Any = None,
        kwargs_chunk_spec: Any = None,
        output_merge_spec: Any = None,
        verify_chunking: bool = True,
    ) -> None:
        self._units = SeqUnits(
            owner=self.name, n_microbatches=n_microbatches, n_seq_chunks=n_seq_chunks,
            seq_partition=seq_partition, seq_dim=seq_dim, seq_len=seq_len,
            loss_reduction=loss_reduction, scale_grads=scale_grads, ignore_index=ignore_index,
        )
        stages = list(stages)
        chunk_check.setup(self.name, stages, n_seq_chunks=n_seq_chunks, enabled=verify_chunking)
        self._check_stages(stages, n_microbatches, n_seq_chunks)
        super().__init__(
            stages=stages,
            n_microbatches=n_microbatches * n_seq_chunks,  # the runtime counts units
            loss_fn=loss_fn,
            args_chunk_spec=args_chunk_spec,
            kwargs_chunk_spec=kwargs_chunk_spec,
            output_merge_spec=output_merge_spec,
            scale_grads=scale_grads,
        )
        p = self.pp_group_size
        orders = self._compute_orders(p, len(stages), n_microbatches, n_seq_chunks)
        try:
            schedule_ir_multi.check_stage_orders(orders, self._num_stages, n_microbatches, n_seq_chunks)
            schedule_ir_multi.check_deadlock_free(orders, self._num_stages)
        except ValueError as e:  # a bug in the order builder, never a user error
            raise RuntimeError(f"{self.name}: internal error, invalid order: {e}") from e
        self._orders = orders
        self.pipeline_order = schedule_ir_multi.to_actions(orders)
        self._prepare_schedule_with_comms(self.pipeline_order)
        self._train_order_with_comms = self.pipeline_order_with_comms
        self._eval_order_with_comms: dict[int, list] | None = None
        # torch's runtime would divide gradients by its unit count; Seq1F1B's weighted
        # chunk losses already sum to a micro-batch's loss, so divide by micro-batches.
        stage_by_index = {s.stage_index: s for s in stages}
        scale = n_microbatches if scale_grads else 1
        _compat.register_action_function(
            self, _compat.REDUCE_GRAD,
            lambda action, ctx: stage_by_index[action.stage_index].perform_reduce_grad(scale),
        )

    # ------------------------------------------------------------------ subclass API
    def _compute_orders(self, num_ranks: int, n_local: int, n_microbatches: int, n_seq_chunks: int) -> dict:
        raise NotImplementedError

    def _expected_stage_indices(self, rank: int, num_ranks: int, num_stages: int) -> list[int]:
        raise NotImplementedError

    # ---------------------------------------------------------------------- checks
    def _check_stages(self, stages: list, n_microbatches: int, n_seq_chunks: int) -> None:
        name = self.name
        if not stages:
            raise ValueError(f"{name}: got no stages")
        for s in stages:
            if n_seq_chunks > 1 and not isinstance(s, SequencePipelineStage):
                raise TypeError(
                    f"{name}(n_seq_chunks={n_seq_chunks}) needs SequencePipelineStage stages "
                    f"(got {type(s).__name__}): build each stage with "
                    "pipelining_seq.SequencePipelineStage(...), same arguments"
                )
        first = stages[0]
        for s in stages[1:]:
            if s.num_stages != first.num_stages or s.group_size != first.group_size or s.group_rank != first.group_rank:
                raise ValueError(
                    f"{name}: the stages of one rank disagree on num_stages / process group "
                    f"({[(x.stage_index, x.num_stages, x.group_rank) for x in stages]})"
                )
        p, n_stages, rank = first.group_size, first.num_stages, first.group_rank
        expected = self._expected_stage_indices(rank, p, n_stages)
        got = sorted(s.stage_index for s in stages)
        if got != expected:
            raise ValueError(
                f"{name}: rank {rank} of {p} holds stages {got}, but the schedule needs "
                f"{expected} ({self._placement_doc(p, n_stages)})"
            )
        if n_microbatches * n_seq_chunks < p:
            raise ValueError(
                f"{name}: n_microbatches ({n_microbatches}) * n_seq_chunks ({n_seq_chunks}) = "
                f"{n_microbatches * n_seq_chunks} units cannot fill the {n_stages} stages on {p} "
                f"ranks: raise n_microbatches or n_seq_chunks so that their product is at least {p}"
            )

    def _placement_doc(self, num_ranks: int, num_stages: int) -> str:
        return ""

    # ------------------------------------------------------------------------ step
    @property
    def compute_orders(self) -> dict[int, list[tuple[str, int, int]]]:
        """Per rank, the ``(kind, stage, unit)`` compute order the IR was built from."""
        return copy.deepcopy(self._orders)

    def _get_pipeline_order(self) -> dict[int, list]:
        """torch's compute-only ``_Action`` IR of every rank."""
        return schedule_ir_multi.to_actions(self._orders)

    def _exchange_lengths(self, local: list[int] | None) -> list[int]:
        group = self._stages[0].group
        g = group or _compat.default_group()
        r, p = self.rank, self.pp_group_size
        return self._units.exchange_lengths(
            local, device=self._stages[0].device, group=group,
            prev_rank=dist.get_global_rank(g, r - 1) if r > 0 else None,
            next_rank=dist.get_global_rank(g, r + 1) if r < p - 1 else None,
            where=f"rank {r}",
        )

    def step(
        self,
        *args: Any,
        target: Any = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One step on a whole batch, like ``ScheduleInterleaved1F1B.step``; ``losses``
        receives one loss per micro-batch. Also accepts torchtitan's pre-split
        ``arg_mbs``/``kwarg_mbs``/``target_mbs``."""
        if self._has_backward and not torch.is_grad_enabled():
            raise RuntimeError("step() requires gradients to be enabled; call eval() for forward-only runs")
        units = self._units
        agreement.check_schedule(self, stage=self._stages[0], units=units,  # once per kind: one small collective
                                 keyword_inputs=kwargs)
        arg_mbs, kwarg_mbs, target_mbs, seq_len = units.split_step(
            args, kwargs, target, self._args_chunk_spec, self._kwargs_chunk_spec
        )
        for stage in self._stages:
            stage.has_backward = self._has_backward
            stage.clear_runtime_states()
        lengths = units.resolve_lengths(seq_len, exchange=self._exchange_lengths if self.pp_group_size > 1 else None)
        for stage in self._stages:
            if isinstance(stage, SequencePipelineStage):
                stage.configure_seq_chunks(n_microbatches=self._units.n_microbatches, chunk_lengths=lengths)
        arg_units, kwarg_units = units.units(arg_mbs), units.units(kwarg_mbs)
        target_units = units.units(target_mbs) if target_mbs is not None else None
        has_last = any(st.is_last for st in self._stages)
        units.set_targets(target_units if has_last and self._loss_fn is not None else None)
        if self._has_backward:
            self.pipeline_order_with_comms = self._train_order_with_comms
            _compat.runtime_step_microbatches(self, arg_units, kwarg_units, target_units, losses, return_outputs, loss_kwargs)
        else:
            self.pipeline_order_with_comms = self._eval_order()
            try:
                with torch.no_grad():
                    _compat.runtime_step_microbatches(self, arg_units, kwarg_units, target_units, losses, return_outputs, loss_kwargs)
            finally:
                self.pipeline_order_with_comms = self._train_order_with_comms
        chunk_check.verify(self, self._stages)  # first step and first eval only
        for stage in self._stages:
            if stage.is_last and return_outputs:
                return self._merge_outputs(units.merge_chunks(stage.output_chunks))
        return None

    def _eval_order(self) -> dict[int, list]:
        """The forwards of the training order, lowered with their sends and receives."""
        if self._eval_order_with_comms is None:
            fwd_only = {
                r: [a for a in actions if a is not None and a.computation_type == _compat.FORWARD]
                for r, actions in self.pipeline_order.items()
            }
            self._eval_order_with_comms = _compat.add_send_recv(
                fwd_only, stage_to_rank=lambda s: self.stage_index_to_group_rank[s], num_stages=self._num_stages
            )
        return self._eval_order_with_comms

    # ---------------------------------------------------------------------- losses
    def _maybe_compute_loss(self, stage, output, target_mbs, mb_index, loss_kwargs=None):
        if stage.is_last and self._loss_fn is not None:
            loss = self._loss_fn(output, target_mbs[mb_index], **(loss_kwargs or {}))
            self._internal_losses.append(self._units.weight_loss(loss, mb_index, output))

    def _update_losses(self, stages, losses):
        stages = stages if isinstance(stages, list) else [stages]
        if any(s.is_last for s in stages) and losses is not None:
            mb_losses = self._units.microbatch_losses(self._internal_losses)
            losses.clear()
            losses.extend(mb_losses)
        self._internal_losses.clear()
