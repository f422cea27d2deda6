"""One chunking setting: how a Seq1F1B schedule cuts micro-batches into sequence chunks.

:class:`ChunkingConfig` is what the three Seq1F1B schedules, :class:`~pipelining_seq.seq_units.SeqUnits`
and the trainer's ``seq1f1b`` recipe section share. The schedules take it as
``chunking=ChunkingConfig(...)`` or, equivalently, as the keywords ``n_seq_chunks``,
``seq_partition``, ... (:func:`chunking_from` turns either into one config).

``seq_partition`` names are resolved by :func:`pipelining_seq.partition.resolve_partition`:
``"uniform"``; ``"balanced"`` (equal modelled FLOPs; needs ``flop_model``, e.g.
``pipelining_seq.models.gpt.flop_model(cfg)``); ``"calibrated"`` (equal measured cost;
needs ``calibrated``, a fitted cost model such as the tools' ``LinearChunkCost`` or a
mapping ``n_seq_chunks -> lengths``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .partition import PARTITION_NAMES, SeqPartition, resolve_partition

__all__ = ["DEFAULT_N_SEQ_CHUNKS", "ChunkingConfig", "chunking_from"]

DEFAULT_N_SEQ_CHUNKS = 4
"""k of a recipe or torchtitan run that does not say (the trainer's ``seq1f1b.num_seq_chunks``,
torchtitan's ``--seq1f1b.n_seq_chunks``); the schedules' own ``n_seq_chunks`` has no default."""


def _check_positive(**values: Any) -> None:
    for name, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}={val!r} must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class ChunkingConfig:
    """Sequence chunking of a Seq1F1B schedule (the defaults are the schedules' keywords')."""

    n_seq_chunks: int
    """k: chunks per micro-batch along ``seq_dim`` (recipes spell it ``num_seq_chunks``)."""
    seq_partition: SeqPartition = "uniform"
    """``"uniform"``, ``"balanced"``, ``"calibrated"``, a list of chunk lengths, or a callable ``seq_len -> lengths``."""
    seq_dim: int = 1
    """Sequence dimension of the inputs and targets given to ``step``."""
    seq_len: int | None = None
    """The sequence length, for stages that receive no input tensors (else the first stage sends the lengths)."""
    loss_reduction: Literal["mean", "sum"] | None = None
    """How chunk losses combine; None: ``"mean"`` if the schedule scales gradients, else ``"sum"``."""
    ignore_index: int | None = -100
    """Target value that does not count in ``"mean"`` mode (integer targets); None counts every target."""
    flop_model: Any = None
    """For ``seq_partition="balanced"``: a :class:`~pipelining_seq.flops.FlopModel`."""
    calibrated: Any = None
    """For ``seq_partition="calibrated"``: a fitted cost model (``balanced_partition(seq_len, k, multiple_of=)``) or ``{k: lengths}``."""
    multiple_of: int = 1
    """Round ``"balanced"`` / ``"calibrated"`` chunk lengths to a multiple of this."""

    def __post_init__(self) -> None:
        _check_positive(n_seq_chunks=self.n_seq_chunks, multiple_of=self.multiple_of)
        if self.loss_reduction not in (None, "mean", "sum"):
            raise ValueError(f"loss_reduction={self.loss_reduction!r}: use 'mean' or 'sum'")
        ii = self.ignore_index
        if ii is not None and (isinstance(ii, bool) or not isinstance(ii, int)):
            raise TypeError(
                f"ignore_index={ii!r} must be an int (the target value the loss ignores, "
                "-100 for F.cross_entropy) or None"
            )
        part, k = self.seq_partition, self.n_seq_chunks
        if isinstance(part, str):
            # With seq_len known, check the lengths now; otherwise the name and what it needs.
            if self.seq_len is not None or part.lower() == "uniform":
                self.lengths(self.seq_len or k)
            else:
                self._check_name()
        elif callable(part):
            if self.seq_len is not None:
                self.lengths(self.seq_len)
        else:
            resolve_partition(part, sum(part), k)
            if self.seq_len is not None and self.seq_len != sum(part):
                raise ValueError(
                    f"seq_len={self.seq_len} but seq_partition {list(part)} sums to "
                    f"{sum(part)}: drop seq_len or make them agree"
                )

    def _check_name(self) -> None:
        name = str(self.seq_partition).lower()
        if name not in PARTITION_NAMES:
            resolve_partition(self.seq_partition, self.n_seq_chunks, self.n_seq_chunks)  # raises, listing the names
        if name == "balanced" and self.flop_model is None:
            raise ValueError(
                "seq_partition='balanced' needs the FLOP model it balances: pass flop_model="
                "pipelining_seq.flops.FlopModel(...) (for the reference GPT: pipelining_seq.models.gpt.flop_model(cfg))"
            )
        if name == "calibrated" and self.calibrated is None:
            raise ValueError(
                "seq_partition='calibrated' needs the measured cost model: pass calibrated=<a fitted "
                "cost model, e.g. pipelining_seq.tools.calibration.fit_chunk_cost(...)> or {n_seq_chunks: lengths}"
            )

    @property
    def static_seq_len(self) -> int | None:
        """The sequence length known before any input is seen (``seq_len``, or an explicit list's sum)."""
        part = self.seq_partition
        if not isinstance(part, str) and not callable(part):
            return sum(part)
        return self.seq_len

    def lengths(self, seq_len: int) -> list[int]:
        """Chunk lengths of a ``seq_len``-token sequence under this setting, validated."""
        return resolve_partition(
            self.seq_partition, seq_len, self.n_seq_chunks, flop_model=self.flop_model,
            calibrated=self.calibrated, multiple_of=self.multiple_of,
        )


_KEYWORDS = ("n_seq_chunks", "seq_partition", "seq_dim", "seq_len", "loss_reduction", "ignore_index")


def chunking_from(owner: str, chunking: ChunkingConfig | None, **keywords: Any) -> ChunkingConfig:
    """The schedule's :class:`ChunkingConfig`: ``chunking``, or one built from the keywords.

    The keywords (``n_seq_chunks``, ``seq_partition``, ...) are the schedules' public
    spelling of the same settings; passing both a config and a non-default keyword is refused.
    """
    unknown = set(keywords) - set(_KEYWORDS)
    if unknown:
        raise TypeError(f"{owner}: unknown chunking keywords {sorted(unknown)}")
    if chunking is None:
        if keywords.get("n_seq_chunks") is None:
            raise TypeError(f"{owner}: pass n_seq_chunks=... (or chunking=ChunkingConfig(n_seq_chunks=..., ...))")
        try:
            return ChunkingConfig(**keywords)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{owner}: {e}") from None
    if not isinstance(chunking, ChunkingConfig):
        raise TypeError(f"{owner}: chunking={chunking!r} must be a pipelining_seq.ChunkingConfig")
    defaults = {f.name: f.default for f in dataclasses.fields(ChunkingConfig)}
    clash = [
        key for key, val in keywords.items()
        if (val is not None if key == "n_seq_chunks" else not _same(val, defaults[key]))
    ]
    if clash:
        raise ValueError(
            f"{owner}: {', '.join(clash)} given next to chunking=ChunkingConfig(...): pass the chunking "
            "settings either in the config or as keywords, not both"
        )
    return chunking


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
