"""``enable(config)``: Seq1F1B wired into a torchtitan ``Trainer.Config`` before it is built.

What it changes, all on the config (nothing global outlives the Trainer's construction):

* the model's inner attentions become :class:`ChunkedAttention` (when the schedule is
  Seq1F1B, or always with ``--seq1f1b.attention always``);
* ``model_spec.parallelize_fn`` also installs the chunk-input hook (document ids, RoPE
  positions) on every model part it returns;
* ``model_spec.pipelining_fn`` runs torchtitan's own pipelining function while
  ``torchtitan.distributed.pipeline_parallel`` resolves ``"Seq1F1B"`` to a bound
  ``ScheduleSeq1F1B`` and builds ``SequencePipelineStage`` instead of ``PipelineStage``.

Every setting is checked first, and a bad one raises naming the knob.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from ...context import chunk_context
from ...stage import SequencePipelineStage
from . import attention as _attention
from .config import Seq1F1BConfig, check_section
from .partition import chunk_multiple, resolve_lengths
from .schedule import SCHEDULE_NAME, seq1f1b_schedule_class

__all__ = ["enable", "is_seq1f1b"]

logger = logging.getLogger(__name__)

_PP_MODULE = "torchtitan.distributed.pipeline_parallel"


def is_seq1f1b(config: Any) -> bool:
    return str(config.parallelism.pipeline_parallel_schedule).lower() == SCHEDULE_NAME.lower()


def _loss_num_chunks(config: Any) -> int | None:
    from torchtitan.components.loss import ChunkedLossWrapper

    return config.loss.num_chunks if isinstance(config.loss, ChunkedLossWrapper.Config) else None


def _check_layout(config: Any) -> None:
    par = config.parallelism
    pp = par.pipeline_parallel_degree
    if par.pipeline_parallel_schedule_csv:
        raise ValueError(
            f"--parallelism.pipeline_parallel_schedule Seq1F1B with --parallelism.pipeline_parallel_schedule_csv "
            f"{par.pipeline_parallel_schedule_csv!r}: a CSV schedule replaces the named one; drop one of them"
        )
    if par.context_parallel_degree > 1:
        raise ValueError(
            f"Seq1F1B with --parallelism.context_parallel_degree {par.context_parallel_degree}: chunking a "
            "context-parallel (sequence-sharded) micro-batch is not supported; set it to 1"
        )
    parts = par.module_fqns_per_model_part
    if parts is not None and len(parts) != pp:
        raise ValueError(
            f"Seq1F1B runs one stage per rank, but --parallelism.module_fqns_per_model_part has {len(parts)} "
            f"parts for --parallelism.pipeline_parallel_degree {pp}: give exactly {pp} parts"
        )
    lps = par.pipeline_parallel_layers_per_stage
    if lps is not None and parts is None:
        n_layers = len(config.model_spec.model.layers)
        stages = math.ceil(
            (n_layers + par.pipeline_parallel_first_stage_less_layers + par.pipeline_parallel_last_stage_less_layers)
            / lps
        )
        if stages != pp:
            raise ValueError(
                f"Seq1F1B runs one stage per rank, but --parallelism.pipeline_parallel_layers_per_stage {lps} "
                f"gives {stages} stages for --parallelism.pipeline_parallel_degree {pp} ({n_layers} layers): "
                "raise it so that there is one stage per rank, or leave it unset"
            )


def _chunk_lengths(config: Any, section: Seq1F1BConfig, partition: str | list[int]) -> list[int]:
    par = config.parallelism
    loss_chunks = _loss_num_chunks(config)
    sp = par.enable_sequence_parallel and par.tensor_parallel_degree > 1
    multiple = chunk_multiple(
        loss_num_chunks=loss_chunks, tp_degree=par.tensor_parallel_degree, sequence_parallel=sp
    )
    seq_len = config.training.seq_len
    lengths = resolve_lengths(
        partition, model_config=config.model_spec.model, seq_len=seq_len,
        n_chunks=section.n_seq_chunks, multiple_of=multiple,
    )
    if loss_chunks and any(s % loss_chunks for s in lengths):
        raise ValueError(
            f"chunk lengths {lengths} (--seq1f1b.partition {section.partition}, --seq1f1b.n_seq_chunks "
            f"{section.n_seq_chunks}) are not all divisible by --loss.num_chunks {loss_chunks}: torchtitan's "
            "ChunkedLossWrapper cuts each chunk that many ways. Use --seq1f1b.partition balanced (aligned "
            "automatically), other lengths, or a --loss.num_chunks that divides them"
        )
    if sp and any(s % par.tensor_parallel_degree for s in lengths):
        raise ValueError(
            f"chunk lengths {lengths} (--seq1f1b.partition {section.partition}) are not all divisible by "
            f"--parallelism.tensor_parallel_degree {par.tensor_parallel_degree}: sequence parallelism shards "
            "every chunk's tokens across the TP ranks. Use --seq1f1b.partition balanced or other lengths"
        )
    return lengths


def _probe_compile(backend: str, document_masking: bool) -> None:
    """Compile a block calling the adapter with ``fullgraph=True``, as torchtitan does."""
    from ...context import ChunkContext, KVCache

    adapter = _attention.ChunkedAttention(
        _attention.ChunkedAttention.Config(backend=backend, document_masking=document_masking)
    )
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    docs = torch.zeros(1, 4, dtype=torch.long) if document_masking else None
    fn = torch.compile(lambda a, b, c: adapter(a, b, c, attention_masks=docs), backend="eager", fullgraph=True)
    ctx = ChunkContext(microbatch=0, chunk=0, n_chunks=2, offset=0, length=4, cache=KVCache())
    try:
        with chunk_context(ctx):
            fn(q, q, q).sum().backward()
    except Exception as err:  # noqa: BLE001 - any failure means "cannot compile"
        raise ValueError(
            "--compile.enable with Seq1F1B: torchtitan compiles every transformer block with "
            "fullgraph=True, and the installed pipelining_seq.ChunkedCausalAttention does not compile "
            f"that way ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Drop "
            "--compile.enable, or compile only the loss: --compile.components loss"
        ) from None
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def _seq1f1b_pipeline_module(schedule_cls: type) -> Iterator[None]:
    import importlib

    pp = importlib.import_module(_PP_MODULE)
    original_lookup, original_stage = pp.get_schedule_class, pp.PipelineStage

    def lookup(name: str) -> type:
        return schedule_cls if name.lower() == SCHEDULE_NAME.lower() else original_lookup(name)

    pp.get_schedule_class, pp.PipelineStage = lookup, SequencePipelineStage
    try:
        yield
    finally:
        pp.get_schedule_class, pp.PipelineStage = original_lookup, original_stage


def _wrap_parallelize(fn: Any, document_masking: bool) -> Any:
    @functools.wraps(fn)
    def parallelize(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        model = fn(model, **kwargs)
        _attention.install_chunk_inputs_hook(model, document_masking=document_masking)
        return model

    parallelize._seq1f1b = True
    return parallelize


def _wrap_pipelining(fn: Any, schedule_cls: type) -> Any:
    @functools.wraps(fn)
    def pipelining(model: torch.nn.Module, **kwargs: Any):
        with _seq1f1b_pipeline_module(schedule_cls):
            schedule, parts, has_first, has_last = fn(model, **kwargs)
        if len(parts) != 1:
            raise ValueError(
                f"Seq1F1B runs one stage per rank, got {len(parts)} model parts on this rank: check "
                "--parallelism.pipeline_parallel_layers_per_stage / module_fqns_per_model_part"
            )
        logger.info("Seq1F1B: %s, chunk lengths %s", type(schedule).__name__, schedule.seq_partition)
        return schedule, parts, has_first, has_last

    pipelining._seq1f1b = True
    return pipelining


def enable(config: Any, **overrides: Any) -> Any:
    """Wire Seq1F1B into a torchtitan ``Trainer.Config``; call once before ``config.build()``.

    The settings come from the config's ``seq1f1b`` section (see :func:`with_seq1f1b`),
    else the defaults of :class:`Seq1F1BConfig`; ``overrides`` (``n_seq_chunks=4``,
    ``partition="balanced"``, ...) replace single fields. Nothing changes unless the
    schedule is ``Seq1F1B`` or ``attention="always"``. Returns ``config``, changed in place.
    """
    section = getattr(config, "seq1f1b", None) or Seq1F1BConfig()
    if overrides:
        section = dataclasses.replace(section, **overrides)
        if hasattr(config, "seq1f1b"):
            config.seq1f1b = section
    spec = config.model_spec
    if spec is None:
        raise ValueError("enable(config): config.model_spec is not set (load the config from a registry first)")
    if any(getattr(getattr(spec, name), "_seq1f1b", False) for name in ("parallelize_fn", "pipelining_fn")):
        return config  # already enabled
    partition = check_section(section, seq_len=config.training.seq_len)
    seq = is_seq1f1b(config)
    pp_on = config.parallelism.pipeline_parallel_degree > 1
    if seq and not pp_on:
        logger.warning("Seq1F1B chosen without pipeline parallelism (pipeline_parallel_degree 1): no effect")
    convert = section.attention == "always" or (section.attention == "auto" and seq)
    if convert:
        converted = _attention.convert_attention(
            spec.model, document_masking=section.document_masking, backend=section.attention_backend
        )
        logger.info("Seq1F1B: %d inner attentions made chunk-aware (%s, ...)", len(converted), converted[:1])
    elif seq and pp_on and section.n_seq_chunks > 1:
        _attention.check_chunk_aware(spec.model)
        if not _attention.has_adapter(spec.model):
            raise _attention.UnsupportedAttentionError(
                "--seq1f1b.attention never, but the model has no chunk-aware attention: its attention "
                "would see only its own chunk. Use --seq1f1b.attention auto"
            )
    new_fns: dict[str, Any] = {}
    if _attention.has_adapter(spec.model):
        new_fns["parallelize_fn"] = _wrap_parallelize(
            spec.parallelize_fn, _attention.uses_document_masking(spec.model)
        )
    if seq and pp_on:
        if spec.pipelining_fn is None:
            raise ValueError(f"model {spec.name} has no pipelining_fn: torchtitan cannot pipeline it")
        _check_layout(config)
        lengths = _chunk_lengths(config, section, partition)
        compile_cfg = config.compile
        if compile_cfg.enable and "model" in compile_cfg.components:
            _probe_compile(section.attention_backend, _attention.uses_document_masking(spec.model))
        cls = seq1f1b_schedule_class(
            n_seq_chunks=section.n_seq_chunks, seq_partition=lengths, seq_len=config.training.seq_len
        )
        new_fns["pipelining_fn"] = _wrap_pipelining(spec.pipelining_fn, cls)
        logger.info("Seq1F1B: k=%d, partition %s -> chunk lengths %s", section.n_seq_chunks, section.partition, lengths)
    if new_fns:
        config.model_spec = dataclasses.replace(spec, **new_fns)
    return config
