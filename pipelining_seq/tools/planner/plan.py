"""Per-stage memory plans: parameters, gradients, optimizer state, and the replayed schedule.

The model is built on the meta device and split into stages as the launcher splits it;
parameters are counted per stage after tensor-parallel and FSDP sharding (the sharded
dimensions come from :mod:`pipelining_seq.parallel.tensor_parallel`'s plan). The
activation bytes of each unit come from :class:`ActivationModel`, a per-token account
of what autograd saves in this implementation (derived tensor by tensor, checked
against :class:`~pipelining_seq.tools.memory.ActivationMemoryMeter` on CPU; see
docs/planner.md). The schedule's own action order (from :mod:`pipelining_seq.registry`)
is then replayed to find the moment of peak memory on every stage.

State bytes, per parameter held by a rank after TP (``N``) and FSDP over ``d`` ranks,
with bf16 mixed precision (FSDP2 ``MixedPrecisionPolicy(bf16, reduce fp32)``, or
autocast when ``d = 1``): fp32 master ``4N/d`` + bf16 compute copy ``2N`` (kept for the
whole step, ``reshard_after_forward=False``) + fp32 gradient accumulation ``4N``
(unsharded until the single reduce-scatter at the end of the step) + AdamW ``8N/d``:
18 bytes per parameter at ``d = 1``, as Megatron's distributed optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ... import registry
from ...models.gpt import GPT, GPTConfig, stage_layer_ranges
from ...parallel.mesh import validate_layout
from ...parallel.tensor_parallel import tp_shard_dim
from .activations import ActivationModel

__all__ = [
    "GiB",
    "MemoryPlan",
    "SCHEDULES",
    "StagePlan",
    "format_plan",
    "parse_bytes",
    "plan_from_config",
    "plan_memory",
    "plan_to_dict",
    "replay",
    "stage_param_counts",
]

logger = logging.getLogger(__name__)

GiB = 1 << 30
SCHEDULES = tuple(s.name for s in registry.SCHEDULES if s.memory_plan)
"""Schedules whose memory the planner models (canonical names of :mod:`pipelining_seq.registry`)."""


def parse_bytes(text: str | int | float) -> int:
    """``"80GB"``, ``"80GiB"``, ``"512MB"`` or a number of bytes. GB means GiB (nvidia-smi
    lists an A100 80GB as 81920 MiB)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot read memory size {text!r}: write e.g. 80GB, 80GiB or 512MB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------------- params
def stage_param_counts(model: GPTConfig, *, pp: int, tp: int, dp_shard: int) -> list[dict[str, int]]:
    """Per stage: parameters held by one rank after TP (``local``), after FSDP too
    (``sharded``), the largest block's local count (``block``), and the total (``full``)."""
    cfg = dataclasses.replace(model, attn_backend="auto")  # the backend holds no parameters
    with torch.device("meta"):
        gpt = GPT(cfg)
    ranges = stage_layer_ranges(cfg.n_layers, pp)
    layer_stage = {i: s for s, r in enumerate(ranges) for i in r}
    out = [dict(full=0, local=0, sharded=0, block=0) for _ in range(pp)]
    blocks: dict[tuple[int, int], int] = {}
    for name, p in gpt.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            s = layer_stage[int(parts[1])]
        else:
            s = 0 if parts[0] == "tok_embeddings" else pp - 1
        shape = list(p.shape)
        dim = tp_shard_dim(name)
        if dim is not None and tp > 1:
            shape[dim] = -(-shape[dim] // tp)
        local = math.prod(shape)
        sharded = -(-shape[0] // dp_shard) * math.prod(shape[1:])  # FSDP2 shards dim 0, padded
        out[s]["full"] += p.numel()
        out[s]["local"] += local
        out[s]["sharded"] += sharded
        if parts[0] == "layers":
            key = (s, int(parts[1]))
            blocks[key] = blocks.get(key, 0) + local
    for (s, _), n in blocks.items():
        out[s]["block"] = max(out[s]["block"], n)
    return out


# ------------------------------------------------------------------------ plan
@dataclass(kw_only=True)
class StagePlan:
    """Predicted memory of one pipeline rank and the stage(s) it holds (bytes)."""

    stage: int
    """The pipeline rank (its stage under one-stage-per-rank schedules)."""
    layers: list[range]
    """Layers of each stage the rank holds (one range per stage, in stage order)."""
    params: int
    """Parameters this rank holds after TP (before FSDP sharding)."""
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    unit_bytes: list[int]
    """Saved activations + stage I/O + own K/V, per chunk index (summed over the rank's stages)."""
    unit_kv_bytes: list[int]
    """The K/V cache share of ``unit_bytes`` (plus prefix concatenations for flash/sdpa)."""
    peak_live_units: int
    """Most units in flight (forward done, backward not) in the schedule's action order."""
    activation_bytes: int = 0
    """Saved activations and stage I/O at the peak moment."""
    kv_bytes: int = 0
    """K/V cache and relayed K/V gradients at the peak moment."""
    transient_bytes: int = 0
    """Backward working set at the peak moment."""
    peak_action: str = ""
    total_bytes: int = 0
    fits: bool = True


@dataclass(kw_only=True)
class MemoryPlan:
    """A whole job's prediction."""

    title: str
    schedule: str
    chunk_lengths: list[int]
    n_microbatches: int
    microbatch_size: int
    pp: int
    dp_shard: int
    tp: int
    sequence_parallel: bool
    gpus: int
    gpu_memory_bytes: int
    reserve_bytes: int
    device: str
    mixed_precision: bool
    attn_backend: str
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(s.total_bytes for s in self.stages)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)


def replay(
    ops, k: int, unit, kv_of, dkv_after, dkv_new, transient_of, *, at_backward: bool = True
) -> tuple[int, int, int, str]:
    """Walk one rank's actions ``(kind, stage, unit)``; return (activations, kv, transient,
    action) at the peak. The byte functions take ``(stage, chunk)``.

    A unit's bytes are alive from its forward to the end of its backward (B, or W when
    the backward is split into I and W). Relayed K/V gradients of a micro-batch
    (``dkv_after``) live from its first chunk's backward (B or I) until its chunk 0's;
    ``dkv_new`` and ``transient_of`` exist only during one backward (B or I).
    """
    live: dict[tuple[int, int], int] = {}
    live_kv: dict[tuple[int, int], int] = {}
    pending: dict[tuple[int, int], int] = {}  # (stage, micro-batch) -> relayed K/V gradients held between backwards
    best = (-1, 0, 0, 0, "")
    multi = len({st for _, st, _ in ops}) > 1  # name the stage in the peak action only when there are several
    for kind, st, u in ops:
        n, j = divmod(u, k)
        if kind == "F":
            live[st, u], live_kv[st, u] = unit(st, j), kv_of(st, j)
        act = sum(live.values()) - sum(live_kv.values())
        kv = sum(live_kv.values()) + sum(pending.values())
        transient = 0
        if kind in ("B", "I"):
            kv += dkv_new(st, j)
            transient = transient_of(st, j)
        total = act + kv + transient
        if total > best[0] and (kind == "F" or at_backward):
            action = f"{st if multi else ''}{kind}{u}"
            best = (total, act, kv, transient, f"{'after' if kind == 'F' else 'during'} {action}")
        if kind in ("B", "W"):
            del live[st, u], live_kv[st, u]
        if kind in ("B", "I"):
            pending[st, n] = dkv_after(st, j)
    return best[1:]


def plan_memory(
    *,
    model: GPTConfig,
    pp: int,
    dp_shard: int,
    tp: int,
    sequence_parallel: bool,
    schedule: str,
    n_microbatches: int,
    microbatch_size: int,
    chunk_lengths: Sequence[int],
    gpu_memory_bytes: int,
    reserve_bytes: int = 2 * GiB,
    device: str = "cuda",
    mixed_precision: bool = True,
    act_bytes: int = 2,
    attn_backend: str = "blockwise",
    loss_fp32: bool = True,
    stages_per_rank: int | None = None,
    title: str = "",
) -> MemoryPlan:
    """Predict every pipeline rank's peak memory (see the module docstring for the model)."""
    info = registry.resolve_schedule(schedule)  # any capitalisation
    schedule = info.name
    v = info.stages_per_rank(stages_per_rank)
    if not info.memory_plan:
        raise ValueError(f"the planner models schedules {SCHEDULES}, not {schedule!r}")
    k = len(chunk_lengths)
    if not info.seq_chunks and k != 1:
        raise ValueError(f"{schedule} runs whole sequences: pass one chunk length, got {list(chunk_lengths)}")
    validate_layout(
        pp=pp, dp_shard=dp_shard, tp=tp, n_layers=model.n_layers, n_heads=model.n_heads,
        n_kv_heads=model.n_kv_heads, chunk_lengths=chunk_lengths, sequence_parallel=sequence_parallel,
    )
    am = ActivationModel(
        model=model, tp=tp, sequence_parallel=sequence_parallel and tp > 1, act_bytes=act_bytes, device=device,
        attn_backend=attn_backend, loss_fp32=loss_fp32,
    )
    b = microbatch_size
    offsets = [sum(chunk_lengths[:j]) for j in range(k)]
    num_stages = pp * v
    counts = stage_param_counts(model, pp=num_stages, tp=tp, dp_shard=dp_shard)
    ranges = stage_layer_ranges(model.n_layers, num_stages)
    plan = MemoryPlan(
        title=title, schedule=schedule, chunk_lengths=list(chunk_lengths), n_microbatches=n_microbatches,
        microbatch_size=b, pp=pp, dp_shard=dp_shard, tp=tp, sequence_parallel=am.sequence_parallel,
        gpus=pp * dp_shard * tp, gpu_memory_bytes=gpu_memory_bytes, reserve_bytes=reserve_bytes,
        device=device, mixed_precision=mixed_precision, attn_backend=am.attn_backend,
    )

    def kv_of(st: int, j: int) -> int:
        return len(ranges[st]) * (am.kv_bytes(chunk_lengths[j], b) + am.kv_concat(offsets[j] + chunk_lengths[j], j, b))

    def unit(st: int, j: int) -> int:
        s, first, last = chunk_lengths[j], st == 0, st == num_stages - 1
        total = len(ranges[st]) * am.layer_saved(s, j, b) + kv_of(st, j) + am.stage_io(s, first=first, last=last, batch=b)
        total += am.embed_saved(s, b) if first else 0
        total += am.head_saved(s, b) if last else 0
        return total

    # Relayed K/V gradients for chunks < j: blockwise keeps one accumulator per chunk;
    # flash/sdpa keep a view of the whole prefix gradient of length o_j + s_j.
    def dkv_after(st: int, j: int) -> int:
        if am.attn_backend == "blockwise":
            return len(ranges[st]) * sum(am.kv_bytes(chunk_lengths[i], b) for i in range(j))
        return len(ranges[st]) * am.kv_bytes(offsets[j] + chunk_lengths[j], b) if j else 0

    def dkv_new(st: int, j: int) -> int:
        if am.attn_backend == "blockwise":
            return dkv_after(st, j)
        return len(ranges[st]) * am.kv_bytes(offsets[j] + chunk_lengths[j], b)

    def transient_of(st: int, j: int) -> int:
        s = chunk_lengths[j]
        extra = am.head_transient(s, b) if st == num_stages - 1 else 0
        grads = 2 * counts[st]["block"] if mixed_precision else 0  # one block's bf16 grads before the fp32 add
        return am.layer_transient(s, b) + extra + grads

    orders = info.orders(pp=pp, n_microbatches=n_microbatches, n_seq_chunks=k, stages_per_rank=v)
    for r in range(pp):
        held = info.rank_stages(pp=pp, rank=r, stages_per_rank=v)
        c = {key: sum(counts[st][key] for st in held) for key in ("local", "sharded")}
        if mixed_precision:
            param_b = 4 * c["sharded"] + 2 * c["local"]
            grad_b = 4 * c["local"]
        else:
            param_b = 4 * c["sharded"] + (4 * c["local"] if dp_shard > 1 else 0)
            grad_b = 4 * c["local"]
        optim_b = 8 * c["sharded"]
        ops = orders[r]
        act, kv, transient, tag = replay(ops, k, unit, kv_of, dkv_after, dkv_new, transient_of)
        sp = StagePlan(
            stage=r, layers=[ranges[st] for st in held], params=c["local"], param_bytes=param_b, grad_bytes=grad_b,
            optimizer_bytes=optim_b, unit_bytes=[sum(unit(st, j) for st in held) for j in range(k)],
            unit_kv_bytes=[sum(kv_of(st, j) for st in held) for j in range(k)], peak_live_units=registry.peak_live_units(ops),
            activation_bytes=act, kv_bytes=kv, transient_bytes=transient, peak_action=tag,
        )
        sp.total_bytes = param_b + grad_b + optim_b + act + kv + transient + reserve_bytes
        sp.fits = sp.total_bytes <= gpu_memory_bytes
        plan.stages.append(sp)
    return plan


# -------------------------------------------------------------------- recipes
def plan_from_config(
    cfg, *, gpus: int | None = None, gpu_memory: str | int = "80GB", reserve: str | int = "2GiB", title: str = ""
) -> MemoryPlan:
    """Plan a loaded recipe (:class:`pipelining_seq.trainer.config.JobConfig`); validates the recipe first
    (not this machine: the data file, folders and devices are the training machine's)."""
    from ...trainer import layout
    from ...trainer.validation import validate_config

    par, tr = cfg.parallelism, cfg.training
    validate_config(cfg, world_size=layout.world_size(cfg) if gpus is None else gpus, machine=False)
    device = "cpu" if tr.device == "cpu" else "cuda"
    mixed = device == "cuda" and tr.mixed_precision_param == "bfloat16"
    g = cfg.model
    return plan_memory(
        model=g, pp=par.pipeline_parallel_degree, dp_shard=par.data_parallel_shard_degree,
        tp=par.tensor_parallel_degree, sequence_parallel=par.enable_sequence_parallel,
        schedule=layout.schedule_info(cfg).name, n_microbatches=layout.n_microbatches(cfg),
        stages_per_rank=layout.stages_per_rank(cfg),
        microbatch_size=par.pipeline_parallel_microbatch_size, chunk_lengths=layout.chunk_lengths(cfg),
        gpu_memory_bytes=parse_bytes(gpu_memory), reserve_bytes=parse_bytes(reserve), device=device,
        mixed_precision=mixed, act_bytes=2 if mixed else 4, attn_backend=g.attn_backend,
        title=title or cfg.job.description,
    )


# ---------------------------------------------------------------------- output
def _g(n: int) -> str:
    return f"{n / GiB:.1f}"


def format_plan(plan: MemoryPlan) -> str:
    """The table ``pipelining-seq plan`` prints (GiB)."""
    k = len(plan.chunk_lengths)
    seq = registry.resolve_schedule(plan.schedule).seq_chunks
    sched = f"{plan.schedule} k={k} chunks {plan.chunk_lengths}" if seq else plan.schedule
    lines = [
        plan.title,
        f"{sched}; {plan.n_microbatches} micro-batches of {plan.microbatch_size} x {sum(plan.chunk_lengths)} tokens",
        f"mesh pp={plan.pp} x dp_shard={plan.dp_shard} x tp={plan.tp}"
        f"{' (sequence parallel)' if plan.sequence_parallel else ''} = {plan.gpus} GPUs of {_g(plan.gpu_memory_bytes)} GiB; "
        f"{'bf16 mixed precision' if plan.mixed_precision else 'fp32'}, {plan.attn_backend} attention on {plan.device}, "
        f"reserve {_g(plan.reserve_bytes)} GiB",
        "",
        f"{'stage':>5} {'layers':>7} {'params':>8} {'param':>6} {'grad':>6} {'optim':>6} "
        f"{'unit act (GiB, chunk 0..k-1)':>30} {'live':>5} {'act':>6} {'kv':>6} {'trans':>6} {'peak':>6}  verdict",
    ]
    for s in plan.stages:
        units = " ".join(_g(u) for u in s.unit_bytes)
        lines.append(
            f"{s.stage:>5} {','.join(f'{r.start}-{r.stop - 1}' for r in s.layers):>7} {s.params / 1e6:>7.0f}M "
            f"{_g(s.param_bytes):>6} {_g(s.grad_bytes):>6} {_g(s.optimizer_bytes):>6} {units:>30} "
            f"{s.peak_live_units:>5} {_g(s.activation_bytes):>6} {_g(s.kv_bytes):>6} {_g(s.transient_bytes):>6} "
            f"{_g(s.total_bytes):>6}  {'fits' if s.fits else 'DOES NOT FIT'}"
        )
    worst = max(plan.stages, key=lambda s: s.total_bytes)
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += [
        "",
        f"predicted peak {_g(plan.peak_bytes)} GiB on stage {worst.stage} ({worst.peak_action}) of "
        f"{_g(plan.gpu_memory_bytes)} GiB: {verdict}",
    ]
    return "\n".join(lines)


def plan_to_dict(plan: MemoryPlan) -> dict:
    d = dataclasses.asdict(plan)
    for s in d["stages"]:
        s["layers"] = [[r.start, r.stop] for r in s["layers"]]
    d["peak_bytes"], d["fits"] = plan.peak_bytes, plan.fits
    return d
