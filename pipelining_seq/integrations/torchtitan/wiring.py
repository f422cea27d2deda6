"""``enable(config)``: Seq1F1B wired into a torchtitan ``Trainer.Config`` before it is built.

What it changes, all on the config (nothing global outlives the Trainer's construction):

* the model's inner attentions become :class:`ChunkedAttention` (when the schedule is
  Seq1F1B, or always with ``--seq1f1b.attention always``);
* ``model_spec.parallelize_fn`` also installs the chunk-input hook (document ids, RoPE
  positions) on every model part it returns;
* ``model_spec.pipelining_fn`` runs torchtitan's own pipelining function while
  ``torchtitan.distributed.pipeline_parallel`` resolves ``"Seq1F1B"`` to a bound
  schedule and builds ``SequencePipelineStage`` (under sequence parallelism a
  :class:`~.stages.SeqShardedPipelineStage`) instead of ``PipelineStage``;
* on gloo, FSDP reduces gradients with SUM (gloo has no ``PREMUL_SUM``).

Every setting is checked first, and a bad one raises naming the knob.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from ... import _compat
from ...context import chunk_context
from . import attention as _attention
from .config import Seq1F1BConfig, check_section
from .partition import chunk_multiple, resolve_lengths
from .schedule import check_schedule_name, seq1f1b_name, seq1f1b_schedule_class
from .stages import stage_class

__all__ = ["StartupRefusal", "enable", "is_seq1f1b"]

logger = logging.getLogger(__name__)

_PP_MODULE = "torchtitan.distributed.pipeline_parallel"


class StartupRefusal(ValueError):
    """A setting that cannot run exactly, found before any process group exists.

    The entry point prints its message once (rank 0), on one line, and exits with status 2.
    """


def is_seq1f1b(config: Any) -> bool:
    """Whether the configured schedule is one of the package's (Seq1F1B, InterleavedSeq1F1B, ...)."""
    return seq1f1b_name(config.parallelism.pipeline_parallel_schedule) is not None


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _loss_num_chunks(config: Any) -> int | None:
    from torchtitan.components.loss import ChunkedLossWrapper

    return config.loss.num_chunks if isinstance(config.loss, ChunkedLossWrapper.Config) else None


def _stages_per_rank(config: Any, multi_stage: bool) -> tuple[int, str]:
    """Stages per rank torchtitan will build, and the flag that decides it."""
    par = config.parallelism
    pp = par.pipeline_parallel_degree
    parts = par.module_fqns_per_model_part
    if parts is not None:
        if len(parts) % pp:
            raise StartupRefusal(
                f"--parallelism.module_fqns_per_model_part has {len(parts)} parts, not a multiple of "
                f"--parallelism.pipeline_parallel_degree {pp}: every rank must hold the same number of stages"
            )
        return len(parts) // pp, "--parallelism.module_fqns_per_model_part"
    lps = par.pipeline_parallel_layers_per_stage
    if lps is None:  # torchtitan's default: one stage per rank, two for multi-stage schedules
        return (2 if multi_stage else 1), "--parallelism.pipeline_parallel_layers_per_stage (unset)"
    n_layers = len(config.model_spec.model.layers)
    stages = math.ceil(
        (n_layers + par.pipeline_parallel_first_stage_less_layers + par.pipeline_parallel_last_stage_less_layers)
        / lps
    )
    flag = f"--parallelism.pipeline_parallel_layers_per_stage {lps}"
    if stages % pp:
        raise StartupRefusal(
            f"{flag} gives {stages} stages ({n_layers} layers), not a multiple of "
            f"--parallelism.pipeline_parallel_degree {pp}: choose a value that gives a multiple of {pp}"
        )
    return stages // pp, flag


def _check_layout(config: Any, schedule: str) -> None:
    par = config.parallelism
    flag = f"--parallelism.pipeline_parallel_schedule {schedule}"
    if par.pipeline_parallel_schedule_csv:
        raise StartupRefusal(
            f"{flag} with --parallelism.pipeline_parallel_schedule_csv "
            f"{par.pipeline_parallel_schedule_csv!r}: a CSV schedule replaces the named one; drop one of them"
        )
    if par.context_parallel_degree > 1:
        raise StartupRefusal(
            f"{flag} with --parallelism.context_parallel_degree {par.context_parallel_degree}: chunking a "
            "context-parallel (sequence-sharded) micro-batch is not supported; set it to 1"
        )
    if schedule == "Seq1F1BZeroBubble":
        # torchtitan 0.3 wraps every decoder part in FSDP2 (apply_fsdp_to_decoder, even at
        # data_parallel_shard_degree 1), and FSDP2 under a backward split into input and
        # weight passes does not accumulate every weight gradient: measured on llama3 PP=2,
        # the last stage's final-norm weight gets a fifth of its gradient and the losses
        # drift from 1F1B by 3e-4 after one step (torch's own InterleavedZeroBubble drifts
        # from Interleaved1F1B the same way); with FSDP taken out the losses are equal.
        raise StartupRefusal(
            f"{flag}: torchtitan wraps every model part in FSDP2, and FSDP2 with a split (input, then "
            "weight) backward loses part of the weight gradients, so this schedule would train with "
            "wrong numbers; use --parallelism.pipeline_parallel_schedule Seq1F1B (or InterleavedSeq1F1B)"
        )
    multi = schedule == "InterleavedSeq1F1B"
    spr, source = _stages_per_rank(config, multi)
    if multi and spr < 2:
        raise StartupRefusal(
            f"{flag} runs several stages per rank, but {source} gives {spr}: lower "
            "--parallelism.pipeline_parallel_layers_per_stage so that each rank holds at least 2, "
            "or use --parallelism.pipeline_parallel_schedule Seq1F1B"
        )
    if not multi and spr != 1:
        raise StartupRefusal(
            f"{flag} runs one stage per rank, but {source} gives {spr} stages per rank: raise "
            "--parallelism.pipeline_parallel_layers_per_stage (or leave it unset), or use "
            "--parallelism.pipeline_parallel_schedule InterleavedSeq1F1B"
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
        raise StartupRefusal(
            f"chunk lengths {lengths} (--seq1f1b.partition {section.partition}, --seq1f1b.n_seq_chunks "
            f"{section.n_seq_chunks}) are not all divisible by --loss.num_chunks {loss_chunks}: torchtitan's "
            "ChunkedLossWrapper cuts each chunk that many ways. Use --seq1f1b.partition balanced (aligned "
            "automatically), other lengths, or a --loss.num_chunks that divides them"
        )
    if sp and any(s % par.tensor_parallel_degree for s in lengths):
        raise StartupRefusal(
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
        raise StartupRefusal(
            "--compile.enable with Seq1F1B: torchtitan compiles every transformer block with "
            "fullgraph=True, and the installed pipelining_seq.ChunkedCausalAttention does not compile "
            f"that way ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Drop "
            "--compile.enable, or compile only the loss: --compile.components loss"
        ) from None
    finally:
        _compat.dynamo_reset()


@contextlib.contextmanager
def _seq1f1b_pipeline_module(schedule_cls: type, schedule: str, seq_shards: int) -> Iterator[None]:
    import importlib

    pp = importlib.import_module(_PP_MODULE)
    original_lookup, original_stage = pp.get_schedule_class, pp.PipelineStage

    def lookup(name: str) -> type:
        return schedule_cls if seq1f1b_name(name) == schedule else original_lookup(name)

    pp.get_schedule_class, pp.PipelineStage = lookup, stage_class(seq_shards)
    try:
        yield
    finally:
        pp.get_schedule_class, pp.PipelineStage = original_lookup, original_stage


def _sum_reductions_on_gloo(model: torch.nn.Module) -> None:
    """FSDP on gloo: reduce-scatter with SUM, not ``PREMUL_SUM(1.0)``.

    torchtitan divides gradients by the global token count itself and sets every FSDP
    module's gradient divide factor to 1.0, which FSDP turns into ``ReduceOp.PREMUL_SUM``;
    gloo has no such op. ``set_force_sum_reduction_for_comms`` makes FSDP reduce with SUM
    and divide afterwards by that same factor (1.0: nothing), the same numbers.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def _wrap_parallelize(fn: Any, document_masking: bool | None) -> Any:
    """``document_masking`` None: no adapter, only the gloo reduction fix."""

    @functools.wraps(fn)
    def parallelize(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        model = fn(model, **kwargs)
        _sum_reductions_on_gloo(model)
        if document_masking is not None:
            _attention.install_chunk_inputs_hook(model, document_masking=document_masking)
        return model

    parallelize._seq1f1b = True
    return parallelize


def _wrap_pipelining(fn: Any, schedule_cls: type, schedule: str, seq_shards: int) -> Any:
    @functools.wraps(fn)
    def pipelining(model: torch.nn.Module, **kwargs: Any):
        with _seq1f1b_pipeline_module(schedule_cls, schedule, seq_shards):
            built, parts, has_first, has_last = fn(model, **kwargs)
        logger.info(
            "%s: %s, %d stage(s) on this rank (%s), chunk lengths %s",
            schedule, type(built).__name__, len(parts), stage_class(seq_shards).__name__, list(built.seq_partition),
        )
        return built, parts, has_first, has_last

    pipelining._seq1f1b = True
    return pipelining


def _say_once(message: str) -> None:
    if _rank0():
        logger.warning(message)


def enable(config: Any, **overrides: Any) -> Any:
    """Wire Seq1F1B into a torchtitan ``Trainer.Config``; call once before ``config.build()``.

    The settings come from the config's ``seq1f1b`` section (see :func:`with_seq1f1b`),
    else the defaults of :class:`Seq1F1BConfig`; ``overrides`` (``n_seq_chunks=4``,
    ``partition="balanced"``, ...) replace single fields. The schedule is
    ``parallelism.pipeline_parallel_schedule``: ``Seq1F1B``, ``InterleavedSeq1F1B`` or
    ``Seq1F1BZeroBubble`` (case-insensitive); with any other schedule nothing changes
    unless ``attention="always"``, and with ``pipeline_parallel_degree`` 1 the model is
    left untouched (a warning says so). Every setting is checked here, before any process
    group exists; a bad one raises :class:`StartupRefusal` (a ``ValueError``) or
    ``UnsupportedAttentionError`` naming the flag. Returns ``config``, changed in place.
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
    par = config.parallelism
    schedule = seq1f1b_name(par.pipeline_parallel_schedule)
    pp_on = par.pipeline_parallel_degree > 1
    if pp_on and not par.pipeline_parallel_schedule_csv:
        check_schedule_name(par.pipeline_parallel_schedule)
    if schedule is not None and not pp_on:
        _say_once(
            f"--parallelism.pipeline_parallel_schedule {schedule} with --parallelism.pipeline_parallel_degree "
            f"{par.pipeline_parallel_degree}: no pipeline, so Seq1F1B is off and the model is left unchanged "
            "(its attention is not replaced); set pipeline_parallel_degree > 1 to use it"
        )
        schedule = None
    convert = section.attention == "always" or (section.attention == "auto" and schedule is not None)
    if convert:
        converted = _attention.convert_attention(
            spec.model, document_masking=section.document_masking, backend=section.attention_backend
        )
        logger.info("Seq1F1B: %d inner attentions made chunk-aware (%s, ...)", len(converted), converted[:1])
    elif schedule is not None and section.n_seq_chunks > 1:
        _attention.check_chunk_aware(spec.model)
        if not _attention.has_adapter(spec.model):
            raise _attention.UnsupportedAttentionError(
                "--seq1f1b.attention never, but the model has no chunk-aware attention: its attention "
                "would see only its own chunk. Use --seq1f1b.attention auto"
            )
    new_fns: dict[str, Any] = {}
    adapter = _attention.has_adapter(spec.model)
    if spec.parallelize_fn is not None:
        new_fns["parallelize_fn"] = _wrap_parallelize(
            spec.parallelize_fn, _attention.uses_document_masking(spec.model) if adapter else None
        )
    elif adapter:
        raise StartupRefusal(f"model {spec.name} has no parallelize_fn to install the Seq1F1B chunk inputs on")
    if schedule is not None:
        if spec.pipelining_fn is None:
            raise StartupRefusal(f"model {spec.name} has no pipelining_fn: torchtitan cannot pipeline it")
        _check_layout(config, schedule)
        lengths = _chunk_lengths(config, section, partition)
        compile_cfg = config.compile
        if compile_cfg.enable and "model" in compile_cfg.components:
            _probe_compile(section.attention_backend, _attention.uses_document_masking(spec.model))
        cls = seq1f1b_schedule_class(
            schedule=schedule, n_seq_chunks=section.n_seq_chunks, seq_partition=lengths,
            seq_len=config.training.seq_len, verify_chunking=section.verify_chunking,
        )
        sp = par.enable_sequence_parallel and par.tensor_parallel_degree > 1
        new_fns["pipelining_fn"] = _wrap_pipelining(
            spec.pipelining_fn, cls, schedule, par.tensor_parallel_degree if sp else 1
        )
        logger.info("Seq1F1B: k=%d, partition %s -> chunk lengths %s", section.n_seq_chunks, section.partition, lengths)
    if new_fns:
        config.model_spec = dataclasses.replace(spec, **new_fns)
    return config
