"""ScheduleInterleavedSeq1F1B: Seq1F1B-I, v virtual stages per rank (loop placement).

A drop-in for torch's ``ScheduleInterleaved1F1B`` over (micro-batch, chunk) units: rank r
holds stages ``r, r+p, ..., r+(v-1)p``, runs ``(v-1)*G + 2*(p-r-1) + (k-1)`` warm-up
forwards and switches virtual stage every G units, G = p units when the chunk count k
divides p (the official Seq1F1B-I order), otherwise the smallest whole number of
micro-batches covering p units. See :mod:`pipelining_seq.schedule_ir_multi`.
"""

from __future__ import annotations

import logging

from . import _compat, registry
from .schedules_runtime import SeqRuntimeSchedule

__all__ = ["ScheduleInterleavedSeq1F1B"]

logger = logging.getLogger(__name__)


@_compat.check_overrides
class ScheduleInterleavedSeq1F1B(SeqRuntimeSchedule):
    """Seq1F1B-I: interleaved 1F1B over sequence-chunk units.

    Args:
        stages: this rank's v :class:`SequencePipelineStage` s, stage indices
            ``rank, rank + p, ...`` (a plain ``PipelineStage`` works only with
            ``n_seq_chunks=1``).
        n_microbatches: micro-batches per step, split along dim 0.
        loss_fn: ``loss_fn(output, target)``, called per unit on the last stage.
        n_seq_chunks, seq_partition, seq_dim, scale_grads, seq_len, loss_reduction, ignore_index,
            chunking, verify_chunking: as in :class:`pipelining_seq.ScheduleSeq1F1B`.
        early_recv: post each receive as early as the action list allows
            (:mod:`pipelining_seq.recv_order`); default on for gloo, off otherwise.

    ``n_microbatches`` must be at most, or a multiple of, ``ceil(p / n_seq_chunks)``
    (p when k = 1, as torch's interleaved rounds), and ``n_microbatches * n_seq_chunks``
    at least p.
    """

    registry_name = "InterleavedSeq1F1B"
    name = "ScheduleInterleavedSeq1F1B"

    def _expected_stage_indices(self, rank: int, num_ranks: int, num_stages: int) -> list[int]:
        if num_stages % num_ranks:
            raise ValueError(
                f"{self.name}: num_stages={num_stages} is not a multiple of the {num_ranks} "
                "pipeline ranks: give every rank the same number of stages"
            )
        return registry.rank_stages(self.registry_name, pp=num_ranks, rank=rank, stages_per_rank=num_stages // num_ranks)

    def _placement_doc(self, num_ranks: int, num_stages: int) -> str:
        return (
            f"loop placement: {num_stages // num_ranks} stages per rank, rank r holds "
            f"stages r, r+{num_ranks}, ...; pass all of them, in any order"
        )
