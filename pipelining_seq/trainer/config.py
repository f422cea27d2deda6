"""The recipe schema: one dataclass per section, a docstring under every field.

A recipe is an OmegaConf YAML file merged over :class:`JobConfig`, then ``key=value``
overrides (dotlist). Section and field names follow torchtitan where it has them
(``parallelism.pipeline_parallel_degree``, ``training.local_batch_size``, ...); the
``seq1f1b`` section is ours. :func:`load_config` rejects unknown keys and wrong types,
:func:`pipelining_seq.trainer.validation.validate_config` checks everything that depends on
several fields, before any process group starts, and names the knob to change.

``python -m pipelining_seq.trainer.config --markdown`` prints the reference (docs/recipes.md).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..chunking import DEFAULT_N_SEQ_CHUNKS
from ..models.gpt import GPTConfig, GPTConfigError

__all__ = [
    "CheckpointConfig",
    "CommConfig",
    "ConfigError",
    "JobConfig",
    "JobSection",
    "LRSchedulerConfig",
    "MetricsConfig",
    "OptimizerConfig",
    "ParallelismConfig",
    "ProfilingConfig",
    "Seq1F1BConfig",
    "TrainingConfig",
    "field_docs",
    "load_config",
    "to_yaml",
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
    skip_nonfinite_steps: int = 0
    """A step whose loss or gradient norm is NaN/inf stops the run (naming the step and the value); up to this many such steps are skipped instead (no optimizer update)."""
    document_masking: bool = False
    """Pack the builtin corpus's documents (paragraphs) with an end-of-document separator, as torchtitan packs samples, and keep attention within each document (block-causal, exact across Seq1F1B chunks). Builtin dataset only."""


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

    num_seq_chunks: int = DEFAULT_N_SEQ_CHUNKS
    """k: chunks each micro-batch is cut into along the sequence (the schedules' and ChunkingConfig's n_seq_chunks)."""
    partition: Any = "uniform"
    """uniform (equal chunks; seq_len divisible by k), balanced (equal modelled FLOPs, the paper's computation-wise partition) or an explicit list of k chunk lengths summing to seq_len."""
    multiple_of: int = 1
    """Round balanced chunk lengths to a multiple of this (e.g. the tp degree, or 8/64/128 for GPU kernels)."""
    verify_chunking: bool = True
    """On the first step, check on every stage that micro-batch 0 run in chunks gives the outputs of one whole-sequence forward (one extra no-grad forward, once); a model that breaks the chunk contract is refused before any update."""


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
    """Sharded checkpoints (torch.distributed.checkpoint, safetensors), a JSON manifest written last."""

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
    async_mode: str = "disabled"
    """disabled (the step waits for the save) or async (shards are written by a background thread from a CPU copy; the manifest follows at the next save or the end of the run)."""
    resume_changes: str = "refuse"
    """On resume, a recipe whose optimizer, lr_scheduler or data settings differ from the checkpoint's: refuse (list them and stop) or apply (train on with the new values from the resume step)."""
    save_on_signal: bool = True
    """On SIGINT/SIGTERM, save a checkpoint at the step boundary where the run stops (when checkpoint.enable)."""


@dataclass(kw_only=True)
class CommConfig:
    """Communication liveness."""

    timeout_s: float = 180.0
    """Seconds any send/recv or collective may wait before the run stops naming the stage, the peer rank, the step and the unit (also the process-group timeout). Raise it for large models whose first step or checkpoint takes longer."""


@dataclass(kw_only=True)
class JobConfig:
    """A whole recipe."""

    job: JobSection = field(default_factory=JobSection)
    """Outputs."""
    model: GPTConfig = field(default_factory=GPTConfig)
    """Model shape (:class:`pipelining_seq.models.GPTConfig`)."""
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
    comm: CommConfig = field(default_factory=CommConfig)
    """Liveness."""


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
        "<!-- Generated by `python -m pipelining_seq.trainer.config --markdown > docs/recipes.md`; do not edit. -->",
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
        msg = (e.msg or str(e) or type(e).__name__).splitlines()[0]
        raise ConfigError(f"{where}: {e.full_key}: {msg}") from None
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        # e.g. a tuple field given a list of the wrong length, or a list merged into a section
        raise ConfigError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


@functools.cache
def _schema() -> Any:
    cfg = OmegaConf.structured(JobConfig)
    # From the class, not an instance: GPTConfig() would fill its derived fields (ffn_dim,
    # n_kv_heads) from the default dim before the recipe's dim is merged in.
    cfg.model = OmegaConf.structured(GPTConfig)
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Schema defaults, then the YAML at ``path`` (if any), then ``key=value`` overrides."""
    cfg = copy.deepcopy(_schema())  # a copy: building the schema is a third of a load
    if path is not None:
        try:
            data = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"recipe file {path!r} does not exist (see `pipelining-seq ls`)") from None
        except Exception as e:  # noqa: BLE001 - YAML syntax errors come in several types
            raise ConfigError(f"recipe file {path!r} is not valid YAML: {e}") from None
        if not OmegaConf.is_dict(data):
            raise ConfigError(
                f"recipe file {path!r} holds a {type(data).__name__.replace('Config', '').lower() or 'value'}, not "
                "sections: a recipe maps section names to fields (e.g. 'training:' then '  steps: 100')"
            )
        cfg = _merge(cfg, data, str(path))
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like section.field=value, got {bad}")
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(f"overrides {list(overrides)}: {e}") from None
        try:
            cfg = _merge(cfg, dot, "override")
        except ConfigError as e:
            for o in overrides:  # name the override that fails, when the error does not
                try:
                    _merge(cfg, OmegaConf.from_dotlist([o]), f"override {o}")
                except ConfigError as one:
                    raise ConfigError(str(one).replace(": None:", ":")) from None
            raise e
    try:
        obj = OmegaConf.to_object(cfg)
    except GPTConfigError as e:  # GPTConfig checks its own shape on construction
        raise ConfigError(e.errors) from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e)) from None
    assert isinstance(obj, JobConfig)
    return obj


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


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
