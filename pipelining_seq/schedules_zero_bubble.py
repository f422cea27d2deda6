"""ScheduleSeq1F1BZeroBubble: Seq1F1B with the backward split into I and W (ZB-H1).

One stage per rank, as :class:`~pipelining_seq.ScheduleSeq1F1B`. Each unit's backward
runs as I (input gradient, including the K/V gradient relayed to the micro-batch's
earlier chunks) on the critical path and W (weight gradient) later: rank r defers its
first r weight passes into the cool-down bubble (ZB-H1), so no rank holds more than
Seq1F1B's rank-0 peak of ``p + k - 1`` units. Built on torch's I/W stage machinery
(``backward_one_chunk(full_backward=False)``, ``backward_weight_one_chunk``) and its
action runtime. See :mod:`pipelining_seq.schedule_ir_multi`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch

from . import schedule_ir_multi
from .partition import SeqPartition
from .schedules_runtime import SeqRuntimeSchedule
from .stage import SequencePipelineStage

__all__ = ["ScheduleSeq1F1BZeroBubble"]

logger = logging.getLogger(__name__)


class ScheduleSeq1F1BZeroBubble(SeqRuntimeSchedule):
    """Seq1F1B-ZB (H1): Seq1F1B with weight gradients deferred into the bubbles.

    Args:
        stage: this rank's :class:`SequencePipelineStage` (or a one-element list), stage
            index equal to the rank.
        n_microbatches, loss_fn, n_seq_chunks, seq_partition, seq_dim, scale_grads,
            seq_len, loss_reduction, ignore_index, verify_chunking: as in
            :class:`pipelining_seq.ScheduleSeq1F1B`.

    ``n_microbatches * n_seq_chunks`` must be at least the number of ranks.
    """

    name = "ScheduleSeq1F1BZeroBubble"

    def __init__(
        self,
        stage: Any,
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
        stages = list(stage) if isinstance(stage, (list, tuple)) else [stage]
        if len(stages) != 1:
            raise ValueError(
                f"{self.name}: takes one stage per rank, got {len(stages)} "
                f"(stage indices {[s.stage_index for s in stages]}); for several stages per "
                "rank use ScheduleInterleavedSeq1F1B"
            )
        super().__init__(
            stages, n_microbatches, loss_fn, n_seq_chunks=n_seq_chunks, seq_partition=seq_partition,
            seq_dim=seq_dim, scale_grads=scale_grads, seq_len=seq_len, loss_reduction=loss_reduction, ignore_index=ignore_index,
            args_chunk_spec=args_chunk_spec, kwargs_chunk_spec=kwargs_chunk_spec,
            output_merge_spec=output_merge_spec, verify_chunking=verify_chunking,
        )
        for s in stages:
            if isinstance(s, SequencePipelineStage):
                # The weight pass may recompute (activation checkpointing) a chunk's
                # attention after later I passes: keep K/V until the last W.
                s.kv_cache.keep_until_drop = True

    @property
    def _stage(self) -> Any:
        return self._stages[0]

    def _expected_stage_indices(self, rank: int, num_ranks: int, num_stages: int) -> list[int]:
        if num_stages != num_ranks:
            raise ValueError(
                f"{self.name}: num_stages={num_stages} but the pipeline has {num_ranks} ranks: "
                "this schedule takes one stage per rank (use ScheduleInterleavedSeq1F1B for more)"
            )
        return [rank]

    def _placement_doc(self, num_ranks: int, num_stages: int) -> str:
        return "one stage per rank, stage index = pipeline rank"

    def _compute_orders(self, num_ranks: int, n_local: int, n_microbatches: int, n_seq_chunks: int) -> dict:
        return schedule_ir_multi.zero_bubble_orders(num_ranks, n_microbatches, n_seq_chunks)
