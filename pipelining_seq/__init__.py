"""Seq1F1B (sequence-level 1F1B pipeline scheduling) for torch.distributed.pipelining."""

from .attention import ChunkedCausalAttention
from .chunk_check import ChunkingReport, check_chunking
from .chunking import ChunkingConfig
from .context import ChunkContext, ContractError, KVCache, chunk_positions, current_chunk
from .partition import balanced_partition, chunk_cost, uniform_partition
from .schedules import ScheduleSeq1F1B
from .schedules_interleaved import ScheduleInterleavedSeq1F1B
from .schedules_zero_bubble import ScheduleSeq1F1BZeroBubble
from .stage import SequencePipelineStage

__all__ = [
    "ChunkContext",
    "ChunkedCausalAttention",
    "ChunkingConfig",
    "ChunkingReport",
    "ContractError",
    "KVCache",
    "ScheduleInterleavedSeq1F1B",
    "ScheduleSeq1F1B",
    "ScheduleSeq1F1BZeroBubble",
    "SequencePipelineStage",
    "balanced_partition",
    "chunk_cost",
    "check_chunking",
    "chunk_positions",
    "current_chunk",
    "uniform_partition",
]

__version__ = "0.1.0"
