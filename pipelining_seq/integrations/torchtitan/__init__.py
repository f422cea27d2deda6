"""Seq1F1B inside torchtitan (0.3): its own Trainer, models, command line and config files.

Command line (torchtitan's own arguments, plus a ``seq1f1b`` section)::

    torchrun --nproc-per-node 2 -m pipelining_seq.integrations.torchtitan \\
        --module llama3 --config llama3_debugmodel \\
        --parallelism.pipeline_parallel_degree 2 \\
        --parallelism.pipeline_parallel_schedule Seq1F1B \\
        --seq1f1b.n_seq_chunks 4 --seq1f1b.partition balanced

Schedules by name (case-insensitive): ``Seq1F1B``, ``InterleavedSeq1F1B`` (several stages
per rank), and torch's; ``Seq1F1BZeroBubble`` is refused under torchtitan's FSDP2. ``--cpu``
runs on gloo CPU ranks, ``--cpu-assets DIR`` writes offline assets (:mod:`.cpu`);
``--module pipelining_seq.integrations.torchtitan.configs`` has SDPA debug models for CPU.

Own entry script::

    from pipelining_seq.integrations.torchtitan import enable, with_seq1f1b
    config = enable(with_seq1f1b(config))      # once, before the Trainer is built
    trainer = config.build()

Config files: return :class:`Seq1F1BTrainer.Config` (a ``Trainer.Config`` with a
``seq1f1b`` section) from a ``config_registry`` function; it enables itself when built.

Importing this package does not import torchtitan; :func:`enable`, :class:`ChunkedAttention`
and :class:`Seq1F1BTrainer` load it on first use. See docs/torchtitan.md.
"""

from __future__ import annotations

from typing import Any

from .config import Seq1F1BConfig, parse_partition, with_seq1f1b
from .schedule import SCHEDULE_NAME, get_schedule_class, patch_schedule_lookup, seq1f1b_schedule_class

__all__ = [
    "ChunkedAttention",
    "SCHEDULE_NAME",
    "Seq1F1BConfig",
    "Seq1F1BTrainer",
    "convert_attention",
    "enable",
    "get_schedule_class",
    "parse_partition",
    "patch_schedule_lookup",
    "seq1f1b_schedule_class",
    "with_seq1f1b",
]

_LAZY = {
    "enable": ("wiring", "enable"),
    "ChunkedAttention": ("attention", "ChunkedAttention"),
    "convert_attention": ("attention", "convert_attention"),
    "Seq1F1BTrainer": ("trainer", "Seq1F1BTrainer"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
