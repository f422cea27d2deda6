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
from typing import Any

import torch

from . import _compat
from .schedules_runtime import SeqRuntimeSchedule
from .stage import SequencePipelineStage

__all__ = ["ScheduleSeq1F1BZeroBubble"]

logger = logging.getLogger(__name__)


@_compat.check_overrides
class ScheduleSeq1F1BZeroBubble(SeqRuntimeSchedule):
    """Seq1F1B-ZB (H1): Seq1F1B with weight gradients deferred into the bubbles.

    Args:
        stage: this rank's :class:`SequencePipelineStage` (or a one-element list), stage
            index equal to the rank.
        n_microbatches, loss_fn: as in :class:`pipelining_seq.ScheduleSeq1F1B`.
        options: the keywords of :class:`pipelining_seq.ScheduleSeq1F1B` (``n_seq_chunks``,
            ..., ``ignore_index``, or ``chunking=``; ``verify_chunking``), and torch's ``scale_grads`` and chunk specs.
        early_recv: post each receive as early as the action list allows
            (:mod:`pipelining_seq.recv_order`); default on for gloo, off otherwise.
        weight_grad_store: run I and W with the stage's weight-gradient store
            (:meth:`SequencePipelineStage.use_weight_grad_store`: ``nn.Linear`` weight
            gradients deferred to W as matrix products, one autograd call per I);
            False, or a stage the store cannot serve, keeps torch's split backward.

    ``n_microbatches * n_seq_chunks`` must be at least the number of ranks.
    """

    registry_name = "Seq1F1BZeroBubble"
    name = "ScheduleSeq1F1BZeroBubble"

    def __init__(self, stage: Any, n_microbatches: int, loss_fn: Callable[..., torch.Tensor] | None = None,
                 *, weight_grad_store: bool = True, **options: Any) -> None:
        super().__init__(stage, n_microbatches, loss_fn, **options)
        for s in self._stages:
            if isinstance(s, SequencePipelineStage):
                # The weight pass may recompute (activation checkpointing) a chunk's
                # attention after later I passes: keep K/V until the last W.
                s.kv_cache.keep_until_drop = True
                s.use_weight_grad_store(weight_grad_store)

    def _own_stages(self, stage: Any) -> list:
        stages = list(stage) if isinstance(stage, (list, tuple)) else [stage]
        if len(stages) != 1:
            raise ValueError(
                f"{self.name}: takes one stage per rank, got {len(stages)} "
                f"(stage indices {[s.stage_index for s in stages]}); for several stages per "
                "rank use ScheduleInterleavedSeq1F1B"
            )
        return stages

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
