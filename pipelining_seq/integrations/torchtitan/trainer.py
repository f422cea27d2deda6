"""``Seq1F1BTrainer``: torchtitan's ``Trainer`` with a ``seq1f1b`` config section.

For config files (``config_registry`` functions) in torchtitan's own style: return
``Seq1F1BTrainer.Config(..., seq1f1b=Seq1F1BConfig(n_seq_chunks=4))``; building it
applies :func:`enable` first. Everything else is torchtitan's ``Trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.trainer import Trainer

from .config import Seq1F1BConfig
from .wiring import enable

__all__ = ["Seq1F1BTrainer"]


class Seq1F1BTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        seq1f1b: Seq1F1BConfig = field(default_factory=Seq1F1BConfig)
        """Seq1F1B settings (used when the schedule is ``Seq1F1B``)."""

    def __init__(self, config: Config) -> None:
        super().__init__(enable(config))
