"""The ``seq1f1b`` section of a torchtitan config.

torchtitan 0.3 builds its config tree from Python dataclasses (``Trainer.Config`` and
its sections, each ``@dataclass(kw_only=True, slots=True)``) and parses ``--section.field``
overrides with tyro; a project adds a section by subclassing ``Trainer.Config``. This
module holds the section (:class:`Seq1F1BConfig`) and :func:`with_seq1f1b`, which
gives any loaded ``Trainer.Config`` the section so that ``--seq1f1b.n_seq_chunks 4``
parses. Nothing here imports torchtitan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ...chunking import DEFAULT_N_SEQ_CHUNKS

__all__ = ["Seq1F1BConfig", "check_section", "parse_partition", "with_seq1f1b"]


@dataclass(kw_only=True, slots=True)
class Seq1F1BConfig:
    """Seq1F1B settings, used when ``parallelism.pipeline_parallel_schedule`` is ``Seq1F1B``."""

    n_seq_chunks: int = DEFAULT_N_SEQ_CHUNKS
    """Sequence chunks per micro-batch (k). 1 runs plain 1F1B order."""

    partition: str = "uniform"
    """How ``training.seq_len`` is cut: ``uniform``, ``balanced`` (equal modelled FLOPs,
    from the model config), or chunk lengths first to last, e.g. ``6144,5120,4096``."""

    attention: Literal["auto", "always", "never"] = "auto"
    """Replace the model's inner attention with the chunk-aware adapter: ``auto`` when the
    schedule is Seq1F1B, ``always`` (also for other schedules, e.g. a 1F1B baseline with
    the same kernel), ``never`` (the model must already be chunk-aware)."""

    document_masking: bool = True
    """Keep torchtitan's block-causal (per-document) masking of flex/varlen attention,
    from the ``positions`` input. ``--seq1f1b.no-document-masking`` attends across packed documents."""

    attention_backend: Literal["auto", "blockwise", "sdpa", "flash"] = "auto"
    """``ChunkedCausalAttention`` backend of the adapter."""

    verify_chunking: bool = True
    """On the first training step and the first validation, check on every stage that its chunked
    forwards of one micro-batch equal one whole-sequence forward, and stop with an error naming
    the first differing submodule if not (:mod:`pipelining_seq.chunk_check`).
    ``--seq1f1b.no-verify-chunking`` turns it off."""


def parse_partition(partition: str) -> str | list[int]:
    """``"uniform"``/``"balanced"``, or the chunk lengths of ``"6144,5120,..."``."""
    text = partition.strip()
    if text.lower() in ("uniform", "balanced"):
        return text.lower()
    try:
        lengths = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        lengths = []
    if not lengths or any(s <= 0 for s in lengths):
        raise ValueError(
            f"--seq1f1b.partition {partition!r}: use 'uniform', 'balanced', or positive chunk "
            "lengths separated by commas (first chunk first), e.g. 6144,5120,4096,3072"
        )
    return lengths


def check_section(section: Seq1F1BConfig, *, seq_len: int) -> str | list[int]:
    """Validate the section against ``training.seq_len``; returns the parsed partition."""
    k = section.n_seq_chunks
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"--seq1f1b.n_seq_chunks {k!r}: must be a positive integer")
    if k > seq_len:
        raise ValueError(
            f"--seq1f1b.n_seq_chunks {k} does not fit training.seq_len {seq_len}: "
            f"use at most {seq_len} chunks"
        )
    parsed = parse_partition(section.partition)
    if isinstance(parsed, list):
        if len(parsed) != k:
            raise ValueError(
                f"--seq1f1b.partition {section.partition!r} gives {len(parsed)} chunk lengths but "
                f"--seq1f1b.n_seq_chunks is {k}: make them agree"
            )
        if sum(parsed) != seq_len:
            raise ValueError(
                f"--seq1f1b.partition {section.partition!r} sums to {sum(parsed)} but "
                f"training.seq_len is {seq_len}: the chunk lengths must add up to it"
            )
    elif parsed == "uniform" and seq_len % k:
        raise ValueError(
            f"--seq1f1b.partition uniform needs training.seq_len ({seq_len}) divisible by "
            f"--seq1f1b.n_seq_chunks ({k}): change one of them, or use --seq1f1b.partition balanced "
            "or explicit lengths"
        )
    for name in ("attention", "attention_backend"):
        allowed = {"attention": ("auto", "always", "never"),
                   "attention_backend": ("auto", "blockwise", "sdpa", "flash")}[name]
        if getattr(section, name) not in allowed:
            raise ValueError(f"--seq1f1b.{name} {getattr(section, name)!r}: choose one of {allowed}")
    return parsed


_UPGRADED: dict[type, type] = {}


def _with_section_class(cls: type) -> type:
    if cls not in _UPGRADED:
        _UPGRADED[cls] = dataclasses.make_dataclass(
            cls.__name__,
            [("seq1f1b", Seq1F1BConfig, field(default_factory=Seq1F1BConfig))],
            bases=(cls,),
            kw_only=True,
            slots=True,
            namespace={"__qualname__": cls.__qualname__, "__module__": cls.__module__},
        )
    return _UPGRADED[cls]


def with_seq1f1b(config: Any, section: Seq1F1BConfig | None = None) -> Any:
    """``config`` (a ``Trainer.Config`` or subclass) with a ``seq1f1b`` section.

    A config that has the section already is returned as is (``section``, if given,
    replaces it). Otherwise a copy is made whose class is a subclass of the config's own
    class with one more field, so ``build()`` still builds the same trainer and tyro
    parses ``--seq1f1b.*`` against it.
    """
    if any(f.name == "seq1f1b" for f in dataclasses.fields(config)):
        if section is not None:
            config.seq1f1b = section
        return config
    cls = _with_section_class(type(config))
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return cls(**values, seq1f1b=section or Seq1F1BConfig())
