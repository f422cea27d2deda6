"""Rank functions for the FSDP2 / tensor-parallel parity tests (spawned by run_ranks)."""

from __future__ import annotations

import gc
import time
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage, _compat
from pipelining_seq.context import ChunkContext, KVCache, chunk_context
from pipelining_seq.models import GPT, GPTConfig, split_stage
from pipelining_seq.parallel import apply_fsdp, build_mesh, parallelize_stage
from pipelining_seq.tools.planner import ActivationModel
from tests.workers.parity_worker import make_batch  # same VOCAB (64) and seed

VOCAB = 64
MODEL = dict(vocab_size=VOCAB, n_layers=4, dim=32, n_heads=4, n_kv_heads=2, mlp="swiglu")
LR, WD = 1e-2, 0.1


def make_model(dtype: torch.dtype, **over) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**MODEL, **over})).to(dtype)


def ce_loss(logits, target):
    if logits.dtype != torch.float64:
        logits = logits.float()  # bf16 logits under mixed precision
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def reference(dtype: torch.dtype, batch: int, seq: int, n_mb: int, **over):
    """Whole-sequence loss per micro-batch, mean gradients, and weights after one AdamW step."""
    model = make_model(dtype, **over)
    x, y = make_batch(batch, seq)
    losses = []
    for xs, ys in zip(x.chunk(n_mb), y.chunk(n_mb)):
        loss = ce_loss(model(xs), ys)
        (loss / n_mb).backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD).step()
    return torch.stack(losses), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class CountAllGathers(TorchDispatchMode):
    """Counts c10d all-gathers (FSDP2's; DTensor's tensor-parallel ones are functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("c10d.") and "allgather" in name:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _step(sched, stage: int, pp: int, x, y, losses):
    if stage == 0:
        return sched.step(x)
    if stage == pp - 1:
        return sched.step(target=y, losses=losses)
    return sched.step()


def gathered_inputs_kept(mlp: str) -> list[bool]:
    """Forward a sequence-parallel model; is each column-parallel input's gathered copy still alive?"""
    mesh = build_mesh(pp=1, dp_shard=dist.get_world_size() // 2, tp=2, device_type="cpu")
    model = make_model(torch.float64, mlp=mlp)
    parallelize_stage(model, mesh=mesh, mixed_precision=False, sequence_parallel=True)
    refs: list = []
    for blk in model.layers.values():
        for lin in (blk.attention.wq, blk.feed_forward.w1):
            lin.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0]._local_tensor)))
    out = model(make_batch(2, 16)[0])
    gc.collect()
    kept = [r() is not None for r in refs]
    out.sum().backward()
    return kept


def tp_saved_bytes(lengths: tuple[int, ...] = (24, 16), batch: int = 2) -> list[dict]:
    """Bytes a tensor-parallel stack saves per unit (DTensor-aware) next to the planner's count."""
    mesh = build_mesh(pp=dist.get_world_size() // 2, dp_shard=1, tp=2, device_type="cpu")
    out = []
    for sp in (False, True):
        for mlp in ("gelu", "swiglu"):
            for dtype in (torch.float32, torch.bfloat16):
                model = make_model(dtype, mlp=mlp, n_layers=2, dim=64, n_kv_heads=None)
                model.tok_embeddings = model.norm = model.output = None
                parallelize_stage(model, mesh=mesh, mixed_precision=False, sequence_parallel=sp)
                params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
                seen: dict[int, int] = {}

                def count(t, seen=seen, params=params):
                    storage = _local(t).untyped_storage()
                    if storage.data_ptr() not in params:
                        seen.setdefault(storage.data_ptr(), storage.nbytes())
                    return t

                cache, keep, offset = KVCache(), [], 0
                am = ActivationModel(model=model.config, tp=2, sequence_parallel=sp, act_bytes=dtype.itemsize,
                                     device="cpu")
                for j, s in enumerate(lengths):
                    seen.clear()
                    x = torch.randn(batch, s, 64, dtype=dtype, requires_grad=True)
                    with (torch.autograd.graph.saved_tensors_hooks(count, lambda t: t),
                          _compat.observe_input_reshard(count),
                          chunk_context(ChunkContext(0, j, len(lengths), offset, s, cache))):
                        keep.append(model(x))
                    offset += s
                    measured = sum(seen.values()) + sum(am.kv_bytes(s, batch) for _ in model.layers)
                    predicted = sum(am.layer_saved(s, j, batch) + am.kv_bytes(s, batch) for _ in model.layers)
                    out.append(dict(sp=sp, mlp=mlp, dtype=str(dtype), chunk=j, measured=measured,
                                    predicted=predicted, kv_cache=cache.nbytes()))
                cache.clear()
                keep.clear()
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def layout_worker(rank: int, world: int, configs: list[dict]) -> list[dict]:
    """Run each layout on this rank; return max differences against the local reference."""
    results = []
    for cfg in configs:
        if "probe" in cfg:
            results.append(dict(name=cfg["name"], kept=gathered_inputs_kept(cfg["probe"])))
            continue
        if "tp_memory" in cfg:
            results.append(dict(name=cfg["name"], units=tp_saved_bytes()))
            continue
        t0 = time.perf_counter()
        pp, dp, tp = cfg["pp"], cfg["dp"], cfg["tp"]
        m, batch, seq, partition = cfg["m"], cfg["batch"], cfg["seq"], cfg["partition"]
        mixed = cfg.get("mixed_precision", False)
        dtype = torch.float32 if mixed else torch.float64
        mesh = build_mesh(pp=pp, dp_shard=dp, tp=tp, device_type="cpu")
        s, d = mesh["pp"].get_local_rank(), mesh["dp_shard"].get_local_rank()
        over = cfg.get("model", {})
        part = split_stage(make_model(dtype, **over), s, pp)
        if cfg.get("reshard_after_forward"):  # negative control for the all-gather count
            apply_fsdp(part, dp_mesh=mesh["dp_shard"], mixed_precision=mixed, reshard_after_forward=True)
        else:
            parallelize_stage(part, mesh=mesh, mixed_precision=mixed, sequence_parallel=cfg.get("sp", False))
        stage = SequencePipelineStage(part, s, pp, torch.device("cpu"), group=mesh["pp"].get_group())
        sched = ScheduleSeq1F1B(stage, m, ce_loss, n_seq_chunks=len(partition), seq_partition=list(partition))
        x, y = make_batch(batch, seq)
        rows = slice(d * batch // dp, (d + 1) * batch // dp)

        losses: list = []
        out = _step(sched, s, pp, x[rows], y[rows], losses)
        grads = {n: _full(p.grad) for n, p in part.named_parameters()}
        opt = torch.optim.AdamW(part.parameters(), lr=LR, weight_decay=WD)
        opt.step()
        weights = {n: _full(p.detach()) for n, p in part.named_parameters()}
        # A second step under CommDebugMode counts FSDP all-gathers: one per parameter
        # group per step, however many units the schedule runs.
        opt.zero_grad(set_to_none=True)
        comm = CountAllGathers()
        with comm:
            _step(sched, s, pp, x[rows], y[rows], [])
        ref_losses, ref_grads, ref_weights = reference(dtype, batch, seq, dp * m, **over)
        ref_losses = ref_losses[d * m:(d + 1) * m]
        n_groups = sum(1 for mod in part.modules() if type(mod).__name__.startswith("FSDP"))
        results.append(dict(
            name=cfg["name"], rank=rank, stage=s, lengths=sched.chunk_lengths,
            loss=(torch.stack(losses) - ref_losses).abs().max().item() if losses else None,
            rel_loss=((torch.stack(losses) - ref_losses).abs() / ref_losses).max().item() if losses else None,
            grad=max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
            grad_scale=max(ref_grads[n].abs().max().item() for n in grads),
            weight=max((weights[n] - ref_weights[n]).abs().max().item() for n in weights),
            n_params=len(grads), expected_params=len([n for n in ref_grads if n in grads]),
            dtensor_params=sum(isinstance(p, DTensor) for p in part.parameters()),
            local_numel=sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in part.parameters()),
            coords=(s, d, mesh["tp"].get_local_rank()),
            param_dtype=str(next(part.parameters()).dtype),
            output_dtype=str(out.dtype) if out is not None else None,
            fsdp_groups=n_groups, fsdp_all_gathers=comm.count,
            units=m * len(partition), seconds=time.perf_counter() - t0,
        ))
    return results
