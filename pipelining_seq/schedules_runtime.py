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

from . import _compat, recv_order, registry, schedule_ir_multi, stage_check
from .chunking import ChunkingConfig
from .partition import SeqPartition
from .seq_units import SeqChunkedSchedule
from .stage import SequencePipelineStage

__all__ = ["SeqRuntimeSchedule"]

logger = logging.getLogger(__name__)


@_compat.check_overrides
class SeqRuntimeSchedule(SeqChunkedSchedule, _compat.PipelineScheduleRuntime):
    """Base of the multi-stage-runtime Seq1F1B schedules (not used directly)."""

    name = "SeqRuntimeSchedule"
    registry_name = ""
    """The schedule's name in :mod:`pipelining_seq.registry` (its orders and admissibility)."""

    def __init__(
        self,
        stages: Sequence[Any],
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        n_seq_chunks: int | None = None,
        seq_partition: SeqPartition = "uniform",
        seq_dim: int = 1,
        scale_grads: bool = True,
        seq_len: int | None = None,
        loss_reduction: Literal["mean", "sum"] | None = None,
        ignore_index: int | None = -100,
        args_chunk_spec: Any = None,
        kwargs_chunk_spec: Any = None,
        output_merge_spec: Any = None,
        chunking: ChunkingConfig | None = None,
        early_recv: bool | None = None,
        verify_chunking: bool = True,
    ) -> None:
        units = self._init_units(
            self.name, n_microbatches, chunking, scale_grads, n_seq_chunks=n_seq_chunks,
            seq_partition=seq_partition, seq_dim=seq_dim, seq_len=seq_len, loss_reduction=loss_reduction,
            ignore_index=ignore_index,
        )
        n_seq_chunks = units.n_seq_chunks
        stages = self._own_stages(stages)
        stage_check.setup(self.name, stages, n_seq_chunks=n_seq_chunks, enabled=verify_chunking)
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
        orders = registry.resolve_schedule(self.registry_name).orders(
            pp=p, n_microbatches=n_microbatches, n_seq_chunks=n_seq_chunks, stages_per_rank=len(stages)
        )
        try:
            schedule_ir_multi.check_stage_orders(orders, self._num_stages, n_microbatches, n_seq_chunks)
            schedule_ir_multi.check_deadlock_free(orders, self._num_stages)
        except ValueError as e:  # a bug in the order builder, never a user error
            raise RuntimeError(f"{self.name}: internal error, invalid order: {e}") from e
        self._orders = orders
        self.pipeline_order = schedule_ir_multi.to_actions(orders)
        self._prepare_schedule_with_comms(self.pipeline_order)
        self._early_recv = self._use_early_recv(early_recv, stages[0])
        self._train_order_with_comms = self._posted_early(self.pipeline_order_with_comms)
        self._eval_order_with_comms: dict[int, list] | None = None
        # torch's runtime would divide gradients by its unit count; Seq1F1B's weighted
        # chunk losses already sum to a micro-batch's loss, so divide by micro-batches.
        stage_by_index = {s.stage_index: s for s in stages}
        scale = n_microbatches if scale_grads else 1
        _compat.register_action_function(
            self, _compat.REDUCE_GRAD,
            lambda action, ctx: stage_by_index[action.stage_index].perform_reduce_grad(scale),
        )

    @staticmethod
    def _use_early_recv(early_recv: bool | None, stage: Any) -> bool:
        # As ScheduleSeq1F1B: on for gloo; NCCL queues receives on its stream in order.
        if early_recv is not None:
            return early_recv
        return dist.get_backend(stage.group or _compat.default_group()) == "gloo"

    def _posted_early(self, order: dict[int, list]) -> dict[int, list]:
        if not self._early_recv:
            return order
        return recv_order.post_receives_early(order, lambda s: self.stage_index_to_group_rank[s])

    # ------------------------------------------------------------------ subclass API
    def _own_stages(self, stages: Any) -> list:
        """This rank's stages as a list (a subclass may accept other forms)."""
        if not isinstance(stages, (list, tuple)):
            raise TypeError(f"{self.name}: stages must be a list of this rank's stages, got {type(stages).__name__}")
        return list(stages)

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
        registry.check_admissible(self.registry_name, pp=p, n_microbatches=n_microbatches,
                                  n_seq_chunks=n_seq_chunks, stages_per_rank=len(stages), owner=name)

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

    def _seq_stages(self) -> list:
        return self._stages

    def _length_peers(self) -> tuple[int | None, int | None, str]:
        g = self._stages[0].group or _compat.default_group()
        r, p = self.rank, self.pp_group_size
        return (
            dist.get_global_rank(g, r - 1) if r > 0 else None,
            dist.get_global_rank(g, r + 1) if r < p - 1 else None,
            f"rank {r}",
        )

    def _run_units(self, arg_units, kwarg_units, target_units, losses, return_outputs, loss_kwargs) -> None:
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

    def _eval_order(self) -> dict[int, list]:
        """The forwards of the training order, lowered with FSDP unshards and their sends and receives."""
        if self._eval_order_with_comms is None:
            # UNSHARD/RESHARD as in the training order: after a training step FSDP stages are
            # resharded, and the runtime refuses to compute on a sharded stage.
            fwd_only = {
                r: _compat.add_unshard_reshard(
                    [a for a in actions if a is not None and a.computation_type == _compat.FORWARD]
                )
                for r, actions in self.pipeline_order.items()
            }
            self._eval_order_with_comms = self._posted_early(_compat.add_send_recv(
                fwd_only, stage_to_rank=lambda s: self.stage_index_to_group_rank[s], num_stages=self._num_stages
            ))
        return self._eval_order_with_comms

