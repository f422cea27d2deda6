"""The recipe schema: one dataclass per section, a docstring under every field.

A recipe is an OmegaConf YAML file merged over :class:`JobConfig`, then ``key=value``
overrides (dotlist). Section and field names follow torchtitan where it has them
(``parallelism.pipeline_parallel_degree``, ``training.local_batch_size``, ...); the
``seq1f1b`` section is ours. :func:`load_config` rejects unknown keys and wrong types,
:func:`validate_config` checks everything that depends on several fields, before any
process group starts, and names the knob to change.

``python -m pipelining_seq.config --markdown`` prints the reference (docs/recipes.md).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .models.gpt import GPTConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "JobConfig",
    "JobSection",
    "LRSchedulerConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelismConfig",
    "ProfilingConfig",
    "Seq1F1BConfig",
    "TrainingConfig",
    "ScheduleInfo",
    "chunk_lengths",
    "field_docs",
    "load_config",
    "n_microbatches",
    "pipeline_layout",
    "resolve_path",
    "resolve_schedule",
    "stage_ranks",
    "stages_per_rank",
    "to_yaml",
    "validate_config",
]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the knob(s) to change."""

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            msg = self.errors[0]
        else:
            msg = f"{len(self.errors)} problems in the recipe:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(msg)


@dataclass(kw_only=True)
class JobSection:
    """Where the run writes its outputs."""

    dump_folder: str = "./outputs"
    """Root of every output of the run; relative output folders below are resolved against it."""
    description: str = ""
    """One line shown by `pipelining-seq ls` and at the start of the run."""


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the reference GPT (mirrors pipelining_seq.models.GPTConfig)."""

    vocab_size: int = 256
    """Vocabulary size; 256 for the built-in byte-level tokenizer, at least the largest token id + 1 for token files."""
    n_layers: int = 4
    """Transformer blocks; must divide evenly over the pipeline stages."""
    dim: int = 128
    """Hidden size."""
    n_heads: int = 4
    """Query heads; dim / n_heads must be even (RoPE)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; null means n_heads."""
    ffn_dim: int | None = None
    """MLP hidden size; null means 4*dim (gelu) or 8/3*dim rounded up to 8 (swiglu)."""
    mlp: str = "gelu"
    """MLP kind: gelu or swiglu."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    attn_backend: str = "auto"
    """ChunkedCausalAttention backend: auto, blockwise, sdpa or flash (flash needs CUDA and flash-attn)."""
    activation_checkpoint: bool = False
    """Recompute each transformer block in backward (saves activation memory, costs one more forward)."""

    def to_gpt_config(self) -> GPTConfig:
        """The ``GPTConfig`` this section describes (raises ValueError on bad shapes)."""
        return GPTConfig(**dataclasses.asdict(self))


@dataclass(kw_only=True)
class TrainingConfig:
    """Data, batch and training-loop settings."""

    seq_len: int = 256
    """Tokens per sequence."""
    local_batch_size: int = 8
    """Sequences per step on each data-parallel rank (global batch = local_batch_size * data_parallel_shard_degree)."""
    steps: int = 200
    """Optimizer steps to train for (counted from 0, including steps before a resume)."""
    seed: int = 0
    """Seeds the weights (per parameter name, so every pipeline layout starts from the same model) and the batch order."""
    dataset: str = "builtin"
    """'builtin' (the byte-level corpus shipped in pipelining_seq/corpus) or a path to a flat token file (.bin)."""
    dataset_dtype: str = "uint16"
    """Token dtype of a .bin token file: uint16 (vocabulary <= 65536) or uint32. Files with an llm.c header are detected."""
    max_norm: float = 1.0
    """Gradient clipping: maximum global L2 norm over all pipeline stages; 0 disables clipping."""
    mixed_precision_param: str = "bfloat16"
    """Compute dtype on CUDA: bfloat16 (autocast, or FSDP2 mixed precision when data_parallel_shard_degree > 1) or float32. CPU always trains in float32."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda. CPU runs use gloo, CUDA runs use nccl."""
    num_threads: int = 0
    """Intra-op threads per process on CPU; 0 means the machine's cores divided by the local processes (at least 1)."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW settings."""

    name: str = "AdamW"
    """Optimizer; only AdamW is supported."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warm-up)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norm weights)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW beta1 and beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""


@dataclass(kw_only=True)
class LRSchedulerConfig:
    """Warm-up then decay of the learning rate (a torch LambdaLR)."""

    warmup_steps: int = 10
    """Steps of linear warm-up from lr/warmup_steps to lr."""
    decay_type: str = "cosine"
    """Decay after warm-up, down to min_lr_factor * lr at the last step: cosine, linear or constant (no decay)."""
    min_lr_factor: float = 0.1
    """Final learning rate as a fraction of optimizer.lr."""


@dataclass(kw_only=True)
class ParallelismConfig:
    """How the model is spread over processes: pipeline (pp) x FSDP2 shards (dp_shard) x tensor parallel (tp)."""

    pipeline_parallel_degree: int = 2
    """Pipeline ranks (pp)."""
    pipeline_parallel_schedule: str = "Seq1F1B"
    """Seq1F1B or any torch built-in schedule: 1F1B, GPipe, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV."""
    pipeline_parallel_microbatch_size: int = 2
    """Sequences per micro-batch; local_batch_size must be a multiple of it (micro-batches = local_batch_size / this)."""
    pipeline_parallel_stages_per_rank: int | None = None
    """Stages each pipeline rank holds; null means 1 for single-stage schedules (Seq1F1B, 1F1B, GPipe) and 2 for the others (ZBVZeroBubble and DualPipeV need exactly 2)."""
    data_parallel_shard_degree: int = 1
    """FSDP2 shard degree (dp_shard); > 1 needs pipelining_seq.parallel."""
    tensor_parallel_degree: int = 1
    """Tensor-parallel degree (tp); must divide n_heads, n_kv_heads and ffn_dim; > 1 needs pipelining_seq.parallel."""
    enable_sequence_parallel: bool = False
    """Shard norms/residuals along the sequence within the tp group; every Seq1F1B chunk length must then be a multiple of tensor_parallel_degree."""


@dataclass(kw_only=True)
class Seq1F1BConfig:
    """Sequence chunking of Seq1F1B (ignored by the other schedules)."""

    num_seq_chunks: int = 4
    """k: chunks each micro-batch is cut into along the sequence."""
    partition: Any = "uniform"
    """uniform (equal chunks; seq_len divisible by k), balanced (equal modelled FLOPs, the paper's computation-wise partition) or an explicit list of k chunk lengths summing to seq_len."""
    multiple_of: int = 1
    """Round balanced chunk lengths to a multiple of this (e.g. the tp degree, or 8/64/128 for GPU kernels)."""


@dataclass(kw_only=True)
class MetricsConfig:
    """Logging: progress line, TensorBoard scalars, throughput and memory."""

    log_freq: int = 10
    """Log (progress line and TensorBoard) every this many steps; also on the first and the last step."""
    enable_tensorboard: bool = False
    """Write TensorBoard scalars (loss, lr, grad norm, tokens/s, TFLOPS, MFU, peak memory per stage)."""
    save_tb_folder: str = "tb"
    """TensorBoard folder, relative to job.dump_folder."""
    peak_tflops_per_device: float | None = None
    """Peak dense TFLOPS of one device, for MFU; null means a known GPU's bf16 peak (H100/H200/A100/...), and no MFU on CPU."""


@dataclass(kw_only=True)
class ProfilingConfig:
    """torch.profiler traces (one chrome trace per rank per profiled window, with PP:<stage><F|B><unit> labels)."""

    enable_profiling: bool = False
    """Record torch.profiler traces."""
    save_traces_folder: str = "profile_traces"
    """Trace folder, relative to job.dump_folder; open it with `tensorboard --logdir` or load a file in ui.perfetto.dev."""
    profile_freq: int = 10
    """Profile a window every this many steps (the window ends on a multiple of profile_freq)."""
    profiler_warmup: int = 1
    """Steps the profiler warms up (not recorded) before each window."""
    profiler_active: int = 1
    """Steps recorded per window."""
    record_shapes: bool = False
    """Record operator input shapes (larger traces)."""
    profile_memory: bool = False
    """Record allocations (larger traces; shown in TensorBoard's memory view)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Per-stage safetensors checkpoints with a JSON manifest written last."""

    enable: bool = False
    """Save checkpoints."""
    folder: str = "checkpoint"
    """Checkpoint folder (one step-NNNNNN subfolder per checkpoint), relative to job.dump_folder."""
    interval: int = 100
    """Save every this many steps, and at the last step."""
    load: str | None = None
    """Resume from: null (start fresh), 'latest' (the newest complete checkpoint in folder; fresh start if none) or a path to a step-NNNNNN folder."""
    keep_latest_k: int = 0
    """Keep only the newest k complete checkpoints; 0 keeps all."""


@dataclass(kw_only=True)
class JobConfig:
    """A whole recipe."""

    job: JobSection = field(default_factory=JobSection)
    """Outputs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Data and loop."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    """Learning-rate schedule."""
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    """Process layout and pipeline schedule."""
    seq1f1b: Seq1F1BConfig = field(default_factory=Seq1F1BConfig)
    """Sequence chunking."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Logging."""
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    """Profiler."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""


# ----------------------------------------------------------------------------- docs
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from the source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _sections() -> list[tuple[str, type]]:
    return [(f.name, f.default_factory) for f in dataclasses.fields(JobConfig)]  # type: ignore[misc]


def _type_name(tp: Any) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "").replace("Any", "str | list[int]")


def to_markdown() -> str:
    """The recipe reference (docs/recipes.md), generated from the field docstrings."""
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by `python -m pipelining_seq.config --markdown > docs/recipes.md`; do not edit. -->",
        "",
        "A recipe is an OmegaConf YAML file over this schema; any field can be overridden on the",
        "command line as `section.field=value` (e.g. `seq1f1b.num_seq_chunks=8`). Unknown keys and",
        "wrong types are rejected, and `pipelining-seq validate <recipe>` checks the combination",
        "without starting processes. Relative output folders are resolved against `job.dump_folder`.",
        "",
    ]
    for name, cls in _sections():
        docs = field_docs(cls)
        lines += [f"## `{name}`", "", inspect.cleandoc(cls.__doc__ or ""), "", "| Field | Type | Default | Meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = "null" if default is None else repr(default) if isinstance(default, str) else str(default)
            shown = shown.replace("True", "true").replace("False", "false")
            doc = docs.get(f.name, "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{f.name}` | `{_type_name(f.type)}` | `{shown}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- loading
def _valid_keys(cfg: Any, full_key: str) -> tuple[str, list[str]]:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = list(node.keys()) if node is not None and OmegaConf.is_dict(node) else []
    return parent or "<top level>", keys


def _merge(base: Any, other: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        section, keys = _valid_keys(base, e.full_key)
        raise ConfigError(
            f"{where}: unknown key '{e.full_key}'; valid keys of {section}: {', '.join(keys)}"
        ) from None
    except ValidationError as e:
        raise ConfigError(f"{where}: {e.full_key}: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Schema defaults, then the YAML at ``path`` (if any), then ``key=value`` overrides."""
    cfg = OmegaConf.structured(JobConfig)
    if path is not None:
        try:
            data = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"recipe file {path!r} does not exist (see `pipelining-seq ls`)") from None
        except Exception as e:  # noqa: BLE001 - YAML syntax errors come in several types
            raise ConfigError(f"recipe file {path!r} is not valid YAML: {e}") from None
        cfg = _merge(cfg, data, str(path))
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like section.field=value, got {bad}")
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(f"overrides {list(overrides)}: {e}") from None
        cfg = _merge(cfg, dot, "override")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e)) from None
    assert isinstance(obj, JobConfig)
    return obj


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------- derived settings
_MULTI_STAGE_V = ("ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class ScheduleInfo:
    """What the training loop needs to know about a schedule name."""

    name: str
    """Canonical name (Seq1F1B or torch's spelling)."""
    multi_stage: bool
    """A PipelineScheduleMulti (several stages per rank)."""
    style: str
    """Stage placement over ranks: 'loop' (rank r holds r, r+pp, ...) or 'v' (r and 2pp-1-r)."""


def resolve_schedule(name: str) -> ScheduleInfo:
    """Seq1F1B, or a torch built-in schedule by its (case-insensitive) name."""
    if name.lower() == "seq1f1b":
        return ScheduleInfo(name="Seq1F1B", multi_stage=False, style="loop")
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle, get_schedule_class

    try:
        cls = get_schedule_class(name)
    except ValueError:
        cls = None
    if cls is None or cls in (PipelineScheduleSingle, PipelineScheduleMulti):
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={name!r} is not a schedule; use Seq1F1B or one of torch's: "
            "1F1B, GPipe, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV"
        )
    canonical = {c.__name__: n for n, c in _torch_schedule_names().items()}[cls.__name__]
    multi = issubclass(cls, PipelineScheduleMulti)
    return ScheduleInfo(name=canonical, multi_stage=multi, style="v" if canonical in _MULTI_STAGE_V else "loop")


@functools.cache
def _torch_schedule_names() -> dict[str, type]:
    from torch.distributed.pipelining import schedules as s

    names = ("1F1B", "GPipe", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
    return {n: s.get_schedule_class(n) for n in names}


def stages_per_rank(cfg: JobConfig) -> int:
    spr = cfg.parallelism.pipeline_parallel_stages_per_rank
    if spr is not None:
        return spr
    return 2 if resolve_schedule(cfg.parallelism.pipeline_parallel_schedule).multi_stage else 1


def n_microbatches(cfg: JobConfig) -> int:
    return cfg.training.local_batch_size // cfg.parallelism.pipeline_parallel_microbatch_size


def stage_ranks(cfg: JobConfig) -> list[int]:
    """Pipeline rank (within the pp group) holding each stage."""
    pp = cfg.parallelism.pipeline_parallel_degree
    n = pp * stages_per_rank(cfg)
    if resolve_schedule(cfg.parallelism.pipeline_parallel_schedule).style == "v":
        return [s if s < pp else n - 1 - s for s in range(n)]
    return [s % pp for s in range(n)]


def pipeline_layout(cfg: JobConfig) -> dict[str, Any]:
    """How the model is cut into stages: what a checkpoint must match to be loaded."""
    from .models.gpt import stage_layer_ranges

    ranks = stage_ranks(cfg)
    ranges = stage_layer_ranges(cfg.model.n_layers, len(ranks))
    return {
        "num_stages": len(ranks),
        "pipeline_parallel_degree": cfg.parallelism.pipeline_parallel_degree,
        "stage_ranks": ranks,
        "stage_layers": [[r.start, r.stop] for r in ranges],
    }


def chunk_lengths(cfg: JobConfig) -> list[int]:
    """Seq1F1B chunk lengths of ``training.seq_len`` (``[seq_len]`` for other schedules)."""
    from .partition import balanced_partition, resolve_partition

    s, seq = cfg.seq1f1b, cfg.training.seq_len
    if resolve_schedule(cfg.parallelism.pipeline_parallel_schedule).name != "Seq1F1B":
        return [seq]
    if isinstance(s.partition, str) and s.partition == "balanced":
        g = cfg.model.to_gpt_config()
        return balanced_partition(
            seq, s.num_seq_chunks, num_layers=g.n_layers, hidden_size=g.dim, num_heads=g.n_heads,
            ffn_hidden_size=g.ffn_dim, vocab_size=g.vocab_size, multiple_of=s.multiple_of,
        )
    return resolve_partition(s.partition, seq, s.num_seq_chunks)


def resolve_path(cfg: JobConfig, path: str) -> str:
    """``path`` relative to ``job.dump_folder`` unless absolute."""
    return path if os.path.isabs(path) else os.path.join(cfg.job.dump_folder, path)


# ------------------------------------------------------------------------- validation
def validate_config(cfg: JobConfig, *, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``; starts no process.

    ``world_size`` (when known) must equal pp * dp_shard * tp.
    """
    errors: list[str] = []
    for check in (_check_model, _check_training, _check_optimizer, _check_parallelism, _check_outputs):
        errors += check(cfg, world_size)
    if not errors:  # these read the combination, so they need the basics right
        errors += _check_seq1f1b(cfg) + _check_checkpoint(cfg)
    if errors:
        raise ConfigError(errors)


def _positive(errors: list[str], **knobs: Any) -> None:
    for knob, value in knobs.items():
        if not isinstance(value, (int, float)) or value <= 0:
            errors.append(f"{knob.replace('__', '.')}={value} must be positive")


def _one_of(errors: list[str], knob: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        errors.append(f"{knob}={value!r}: use one of {', '.join(choices)}")


def _check_model(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    m = cfg.model
    _positive(errors, model__vocab_size=m.vocab_size, model__n_layers=m.n_layers, model__dim=m.dim, model__n_heads=m.n_heads)
    if m.n_kv_heads is not None:
        _positive(errors, model__n_kv_heads=m.n_kv_heads)
    if m.ffn_dim is not None:
        _positive(errors, model__ffn_dim=m.ffn_dim)
    _one_of(errors, "model.attn_backend", m.attn_backend, ("auto", "blockwise", "sdpa", "flash"))
    if not errors:
        try:
            m.to_gpt_config()
        except (ValueError, ZeroDivisionError) as e:
            errors.append(str(e))
    return errors


def _check_training(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    t = cfg.training
    _positive(errors, training__seq_len=t.seq_len, training__local_batch_size=t.local_batch_size, training__steps=t.steps)
    if t.max_norm < 0:
        errors.append(f"training.max_norm={t.max_norm} must be >= 0 (0 disables clipping)")
    if t.num_threads < 0:
        errors.append(f"training.num_threads={t.num_threads} must be >= 0 (0 = automatic)")
    _one_of(errors, "training.mixed_precision_param", t.mixed_precision_param, ("bfloat16", "float32"))
    _one_of(errors, "training.device", t.device, ("auto", "cpu", "cuda"))
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append("training.device='cuda' but no CUDA device is available: use training.device=cpu or auto")
    _one_of(errors, "training.dataset_dtype", t.dataset_dtype, ("uint16", "uint32"))
    if errors:
        return errors
    from . import data

    try:
        info = data.inspect_dataset(t.dataset, dtype=t.dataset_dtype)
    except (OSError, ValueError) as e:
        return [f"training.dataset={t.dataset!r}: {e}"]
    if info.n_tokens < t.seq_len + 1:
        errors.append(
            f"training.dataset={t.dataset!r} holds {info.n_tokens} tokens, fewer than training.seq_len + 1 = "
            f"{t.seq_len + 1}: lower training.seq_len or use a larger dataset"
        )
    if info.max_token >= cfg.model.vocab_size:
        errors.append(
            f"training.dataset={t.dataset!r} has token id {info.max_token} but model.vocab_size={cfg.model.vocab_size}: "
            f"raise model.vocab_size to at least {info.max_token + 1} (or check training.dataset_dtype)"
        )
    return errors


def _check_optimizer(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    o, s = cfg.optimizer, cfg.lr_scheduler
    if o.name.lower() != "adamw":
        errors.append(f"optimizer.name={o.name!r}: only AdamW is supported")
    _positive(errors, optimizer__lr=o.lr, optimizer__eps=o.eps)
    if o.weight_decay < 0:
        errors.append(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        errors.append(f"optimizer.betas={list(o.betas)}: need two values in [0, 1)")
    if s.warmup_steps < 0:
        errors.append(f"lr_scheduler.warmup_steps={s.warmup_steps} must be >= 0")
    _one_of(errors, "lr_scheduler.decay_type", s.decay_type, ("cosine", "linear", "constant"))
    if not 0 <= s.min_lr_factor <= 1:
        errors.append(f"lr_scheduler.min_lr_factor={s.min_lr_factor} must be in [0, 1]")
    return errors


def _check_parallelism(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    p, m = cfg.parallelism, cfg.model
    pp, dp, tp = p.pipeline_parallel_degree, p.data_parallel_shard_degree, p.tensor_parallel_degree
    _positive(
        errors, parallelism__pipeline_parallel_degree=pp, parallelism__data_parallel_shard_degree=dp,
        parallelism__tensor_parallel_degree=tp, parallelism__pipeline_parallel_microbatch_size=p.pipeline_parallel_microbatch_size,
    )
    try:
        info = resolve_schedule(p.pipeline_parallel_schedule)
    except ConfigError as e:
        errors += e.errors
    if errors:
        return errors
    if world_size is not None and world_size != pp * dp * tp:
        errors.append(
            f"{world_size} processes but parallelism.pipeline_parallel_degree ({pp}) * data_parallel_shard_degree ({dp}) "
            f"* tensor_parallel_degree ({tp}) = {pp * dp * tp}: make them agree (--nproc-per-node {pp * dp * tp})"
        )
    spr = p.pipeline_parallel_stages_per_rank
    if spr is not None and spr < 1:
        errors.append(f"parallelism.pipeline_parallel_stages_per_rank={spr} must be positive (or null)")
    elif not info.multi_stage and spr not in (None, 1):
        errors.append(
            f"parallelism.pipeline_parallel_schedule={info.name} runs one stage per rank but "
            f"parallelism.pipeline_parallel_stages_per_rank={spr}: set it to 1 or null, or pick Interleaved1F1B"
        )
    elif info.multi_stage and spr is not None and (spr < 2 or (info.style == "v" and spr != 2)):
        need = "exactly 2" if info.style == "v" else "at least 2"
        errors.append(f"parallelism.pipeline_parallel_stages_per_rank={spr}: {info.name} needs {need} stages per rank")
    if errors:
        return errors
    spr = stages_per_rank(cfg)
    n_stages = pp * spr
    if m.n_layers % n_stages:
        where = "parallelism.pipeline_parallel_degree" + (" * pipeline_parallel_stages_per_rank" if spr > 1 else "")
        errors.append(
            f"model.n_layers={m.n_layers} cannot be split evenly over {n_stages} pipeline stages ({where}): "
            f"use a multiple of {n_stages} layers or change {where.split(' ')[0]}"
        )
    mbs = p.pipeline_parallel_microbatch_size
    if cfg.training.local_batch_size % mbs:
        errors.append(
            f"training.local_batch_size={cfg.training.local_batch_size} is not divisible by "
            f"parallelism.pipeline_parallel_microbatch_size={mbs}: make the batch a multiple of the micro-batch size"
        )
        return errors
    nmb = n_microbatches(cfg)
    k = cfg.seq1f1b.num_seq_chunks
    if info.name == "Seq1F1B" and k >= 1 and nmb * k < pp:
        errors.append(
            f"Seq1F1B needs micro-batches * seq1f1b.num_seq_chunks >= pipeline stages: {nmb} * {k} < {pp}; raise "
            "training.local_batch_size, lower parallelism.pipeline_parallel_microbatch_size or raise seq1f1b.num_seq_chunks"
        )
    if info.name == "1F1B" and nmb < pp:
        errors.append(
            f"1F1B needs at least as many micro-batches as stages: {nmb} < {pp}; raise training.local_batch_size or "
            "lower parallelism.pipeline_parallel_microbatch_size (Seq1F1B only needs micro-batches * chunks >= stages)"
        )
    if info.name == "DualPipeV" and nmb < n_stages:
        errors.append(f"DualPipeV needs at least {n_stages} micro-batches (one per stage), got {nmb}: raise training.local_batch_size")
    if info.name in ("Interleaved1F1B", "InterleavedZeroBubble") and nmb % max(1, nmb // pp):
        errors.append(
            f"{info.name} needs the micro-batch count ({nmb}) to be a multiple of the rounds ({nmb // pp}): use a "
            f"multiple of parallelism.pipeline_parallel_degree={pp} micro-batches"
        )
    if tp > 1:
        g = m.to_gpt_config()
        for knob, val in (("model.n_heads", g.n_heads), ("model.n_kv_heads", g.n_kv_heads), ("model.ffn_dim", g.ffn_dim)):
            if val % tp:
                errors.append(f"{knob}={val} is not divisible by parallelism.tensor_parallel_degree={tp}")
    if p.enable_sequence_parallel and tp == 1:
        errors.append("parallelism.enable_sequence_parallel=true needs parallelism.tensor_parallel_degree > 1")
    if dp * tp > 1 and importlib.util.find_spec("pipelining_seq.parallel") is None:
        errors.append(
            "parallelism.data_parallel_shard_degree/tensor_parallel_degree > 1 need pipelining_seq.parallel, which this "
            "install lacks: set both to 1"
        )
    return errors


def _check_outputs(cfg: JobConfig, world_size: int | None) -> list[str]:
    errors: list[str] = []
    mt, pr, ck = cfg.metrics, cfg.profiling, cfg.checkpoint
    _positive(errors, metrics__log_freq=mt.log_freq, profiling__profile_freq=pr.profile_freq,
              profiling__profiler_active=pr.profiler_active, checkpoint__interval=ck.interval)
    if mt.peak_tflops_per_device is not None and mt.peak_tflops_per_device <= 0:
        errors.append(f"metrics.peak_tflops_per_device={mt.peak_tflops_per_device} must be positive (or null)")
    if pr.profiler_warmup < 0 or pr.profiler_warmup + pr.profiler_active > pr.profile_freq:
        errors.append(
            f"profiling.profiler_warmup ({pr.profiler_warmup}) + profiler_active ({pr.profiler_active}) must fit in "
            f"profiling.profile_freq ({pr.profile_freq})"
        )
    if ck.keep_latest_k < 0:
        errors.append(f"checkpoint.keep_latest_k={ck.keep_latest_k} must be >= 0 (0 keeps all)")
    return errors


def _check_seq1f1b(cfg: JobConfig) -> list[str]:
    s, seq = cfg.seq1f1b, cfg.training.seq_len
    name = resolve_schedule(cfg.parallelism.pipeline_parallel_schedule).name
    tp = cfg.parallelism.tensor_parallel_degree
    if name != "Seq1F1B":
        if cfg.parallelism.enable_sequence_parallel and seq % tp:
            return [f"training.seq_len={seq} must be a multiple of parallelism.tensor_parallel_degree={tp} with sequence parallelism"]
        return []
    errors: list[str] = []
    _positive(errors, seq1f1b__num_seq_chunks=s.num_seq_chunks, seq1f1b__multiple_of=s.multiple_of)
    part = s.partition
    if isinstance(part, str):
        _one_of(errors, "seq1f1b.partition", part, ("uniform", "balanced"))
    elif not (isinstance(part, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in part)):
        errors.append(f"seq1f1b.partition={part!r}: use uniform, balanced or a list of integer chunk lengths")
    if errors:
        return errors
    try:
        lengths = chunk_lengths(cfg)
    except ValueError as e:
        msg = str(e).replace("n_seq_chunks", "seq1f1b.num_seq_chunks").replace("multiple_of=", "seq1f1b.multiple_of=")
        return [f"seq1f1b.partition={part!r} with seq1f1b.num_seq_chunks={s.num_seq_chunks} and training.seq_len={seq}: {msg}"]
    if cfg.parallelism.enable_sequence_parallel and any(n % tp for n in lengths):
        errors.append(
            f"chunk lengths {lengths} must be multiples of parallelism.tensor_parallel_degree={tp} with sequence "
            "parallelism: set seq1f1b.multiple_of to a multiple of it (balanced) or pick lengths that are"
        )
    return errors


def _check_checkpoint(cfg: JobConfig) -> list[str]:
    ck = cfg.checkpoint
    if not ck.enable and ck.load is None:
        return []
    from . import checkpoint

    return checkpoint.config_problems(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Recipe schema tools.")
    parser.add_argument("--markdown", action="store_true", help="print the recipe reference (docs/recipes.md)")
    parser.add_argument("--defaults", action="store_true", help="print the default recipe as YAML")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(to_markdown())
    elif args.defaults:
        sys.stdout.write(to_yaml(JobConfig()))
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
