"""ScheduleInterleavedSeq1F1B: Seq1F1B-I, v virtual stages per rank (loop placement).

A drop-in for torch's ``ScheduleInterleaved1F1B`` over (micro-batch, chunk) units: rank r
holds stages ``r, r+p, ..., r+(v-1)p``, runs ``(v-1)*G + 2*(p-r-1) + (k-1)`` warm-up
forwards and switches virtual stage every G units, G = p units when the chunk count k
divides p (the official Seq1F1B-I order), otherwise the smallest whole number of
micro-batches covering p units. See :mod:`pipelining_seq.schedule_ir_multi`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from . import schedule_ir_multi
from .partition import SeqPartition
from .schedules_runtime import SeqRuntimeSchedule

__all__ = ["ScheduleInterleavedSeq1F1B"]

logger = logging.getLogger(__name__)


class ScheduleInterleavedSeq1F1B(SeqRuntimeSchedule):
    """Seq1F1B-I: interleaved 1F1B over sequence-chunk units.

    Args:
        stages: this rank's v :class:`SequencePipelineStage` s, stage indices
            ``rank, rank + p, ...`` (a plain ``PipelineStage`` works only with
            ``n_seq_chunks=1``).
        n_microbatches: micro-batches per step, split along dim 0.
        loss_fn: ``loss_fn(output, target)``, called per unit on the last stage.
        n_seq_chunks, seq_partition, seq_dim, scale_grads, seq_len, loss_reduction, ignore_index,
            verify_chunking: as in :class:`pipelining_seq.ScheduleSeq1F1B`.

    ``n_microbatches`` must be at most, or a multiple of, ``ceil(p / n_seq_chunks)``
    (p when k = 1, as torch's interleaved rounds), and ``n_microbatches * n_seq_chunks``
    at least p.
    """

    name = "ScheduleInterleavedSeq1F1B"

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
        if not isinstance(stages, (list, tuple)):
            raise TypeError(
                f"{self.name}: stages must be a list of this rank's stages, got {type(stages).__name__}"
            )
        super().__init__(
            stages, n_microbatches, loss_fn, n_seq_chunks=n_seq_chunks, seq_partition=seq_partition,
            seq_dim=seq_dim, scale_grads=scale_grads, seq_len=seq_len, loss_reduction=loss_reduction, ignore_index=ignore_index,
            args_chunk_spec=args_chunk_spec, kwargs_chunk_spec=kwargs_chunk_spec,
            output_merge_spec=output_merge_spec, verify_chunking=verify_chunking,
        )

    def _check_stages(self, stages: list, n_microbatches: int, n_seq_chunks: int) -> None:
        super()._check_stages(stages, n_microbatches, n_seq_chunks)
        p = stages[0].group_size
        # Fails here, before any communication, when m does not fit the rounds.
        schedule_ir_multi.interleaved_group_size(p, n_microbatches, n_seq_chunks)

    def _expected_stage_indices(self, rank: int, num_ranks: int, num_stages: int) -> list[int]:
        if num_stages % num_ranks:
            raise ValueError(
                f"{self.name}: num_stages={num_stages} is not a multiple of the {num_ranks} "
                "pipeline ranks: give every rank the same number of stages"
            )
        return list(range(rank, num_stages, num_ranks))

    def _placement_doc(self, num_ranks: int, num_stages: int) -> str:
        return (
            f"loop placement: {num_stages // num_ranks} stages per rank, rank r holds "
            f"stages r, r+{num_ranks}, ...; pass all of them, in any order"
        )

    def _compute_orders(self, num_ranks: int, n_local: int, n_microbatches: int, n_seq_chunks: int) -> dict:
        return schedule_ir_multi.interleaved_orders(num_ranks, n_local, n_microbatches, n_seq_chunks)
