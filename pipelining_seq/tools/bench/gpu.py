"""``bench gpu``: a one-GPU check of the pieces Seq1F1B's speed and memory rest on.

Sections (each catches and reports its own failure, so one broken piece does not hide
the others):

1. ``parity``: chunked attention (blockwise, sdpa, flash if importable) against full
   causal attention, fp32 and bf16, forward and gradients, measured against a float64
   reference next to the unchunked kernel's own error in the same dtype.
   ``documents``: the same for the blockwise backend with packed documents
   (``document_ids``, two batch rows of different layouts, boundaries inside chunks)
   against full attention with the block-diagonal causal mask, recording which kernel
   the masked tiles ran (``efficient`` on CUDA, ``cpu`` on CPU); and the time and peak
   memory of the chunked forward+backward with documents against the same without.
   ``weight_grad``: the zero-bubble W pass. A stack of GPT blocks run chunk by chunk
   with input-gradient-only backwards (I, the weight-gradient store capturing) and then
   the store's weight passes (W) against a full backward (B): parameter gradients
   against a float64 unchunked reference next to the dtype's own error, and the time
   of I+W against B.
2. ``chunk_times``: forward+backward time per chunk of a stack of real-size layers
   (hidden 4096, 32 heads, S=32k, k=4 by default) for the whole sequence and for
   uniform, FLOP-balanced and calibrated (``linear_fit``) partitions.
3. ``stage_memory``: peak ``torch.cuda.max_memory_allocated`` of one stage (rank 0 of
   p) running its Seq1F1B action list against its 1F1B action list, in one process:
   the stage's module is driven directly, received activations and output gradients
   are random local tensors.
4. ``simulate``: the simulator fed with section 2's measured per-chunk times.

``--smoke`` runs everything on CPU at toy sizes (the test suite does, so it cannot rot).
Writes ``gpu.json`` under ``--out`` / ``$OUT`` and prints one table at the end.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels, schedule_ir
from ...attention import ChunkedCausalAttention, flash_attn_available
from ...context import ChunkContext, KVCache, chunk_context
from ...models.gpt import Block, GPTConfig, flop_model
from ...partition import PARTITION_NAMES, resolve_partition, uniform_partition
from ...weight_grad import WeightGradStore
from .. import simulate
from ..calibration import default_samples, fit_chunk_cost, time_chunk, time_chunks
from ..memory import ActivationMemoryMeter
from .common import env_info, out_dir, print_table, write_results
from .memory import expected_peak

__all__ = ["GpuCheckConfig", "add_arguments", "main", "run_checks"]

logger = logging.getLogger(__name__)

GIB = 2**30


def _layers_gpt(*, n_layers: int, dim: int, n_heads: int) -> GPTConfig:
    # A stack of blocks: MHA, GELU MLP; vocabulary 1 (the FLOP model's head term is then negligible).
    return GPTConfig(vocab_size=1, n_layers=n_layers, dim=dim, n_heads=n_heads, ffn_dim=4 * dim, mlp="gelu")


@dataclass(frozen=True)
class GpuCheckConfig:
    """Sizes of the GPU check (defaults: real size; see ``SMOKE`` for the CPU toy)."""

    model: GPTConfig = field(default_factory=lambda: _layers_gpt(n_layers=4, dim=4096, n_heads=32))
    """The timed layers (``n_layers`` of them in the chunk-timing stack); no embedding or head."""
    seq_len: int = 32768
    """Sequence length of the timed layers and the stage-memory run."""
    chunks: int = 4
    """Seq1F1B chunks k."""
    mem_layers: int = 1
    """Layers in the stage of the memory section."""
    pp: int = 4
    """Pipeline size p the stage-memory and simulator sections assume (stage 0 is run)."""
    microbatches: int = 8
    """Micro-batches m for the stage-memory and simulator sections."""
    parity_seq: int = 4096
    """Sequence length of the attention parity check."""
    parity_heads: int = 8
    """Heads of the attention parity check."""
    parity_head_dim: int = 128
    """Head dim of the attention parity check."""
    doc_batch: int = 2
    """Batch rows of the documents check (each its own document layout; sizes as parity's)."""
    wgrad_layers: int = 2
    """GPT blocks of the weight-gradient check (dim parity_heads * parity_head_dim, parity_seq tokens)."""
    repeats: int = 3
    """Timed repeats per partition (medians)."""
    calib_repeats: int = 2
    """Repeats per calibration sample."""
    dtype: str = "bfloat16"
    """Compute dtype of the timing and memory sections."""


SMOKE = GpuCheckConfig(model=_layers_gpt(n_layers=2, dim=64, n_heads=4), seq_len=256, chunks=4, mem_layers=1, pp=4,
                       microbatches=8, parity_seq=128, parity_heads=4, parity_head_dim=16, repeats=1, calib_repeats=1,
                       dtype="float32")


def _stack(cfg: GpuCheckConfig, n_layers: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        stack = nn.Sequential(*[Block(cfg.model) for _ in range(n_layers)])
    return stack.to(getattr(torch, cfg.dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ 1. parity
def _chunked_attention(backend: str, q, k, v, g, lengths, ids=None):
    attn = ChunkedCausalAttention(backend=backend)
    cache = KVCache()
    offs = [sum(lengths[:j]) for j in range(len(lengths))]
    outs, leaves = [], []
    for j, s in enumerate(lengths):
        part = [t[:, :, offs[j]:offs[j] + s].detach().requires_grad_() for t in (q, k, v)]
        with chunk_context(ChunkContext(0, j, len(lengths), offs[j], s, cache)):
            docs = None if ids is None else ids[:, offs[j]:offs[j] + s]
            outs.append(attn(*part, document_ids=docs))
        leaves.append(part)
    for j in reversed(range(len(lengths))):
        with chunk_context(ChunkContext(0, j, len(lengths), offs[j], lengths[j], cache, recompute=True)):
            outs[j].backward(g[:, :, offs[j]:offs[j] + lengths[j]])
    out = torch.cat([o.detach() for o in outs], 2)
    return [out] + [torch.cat([lv[i].grad for lv in leaves], 2) for i in range(3)]


def _full_attention(q, k, v, g, mask=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=groups > 1)
    out.backward(g)
    return [out.detach(), q.grad, k.grad, v.grad]


def _rel_err(got, ref) -> float:
    return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))


def section_parity(cfg: GpuCheckConfig, device: torch.device) -> list[dict]:
    rows = []
    S, H, D = cfg.parity_seq, cfg.parity_heads, cfg.parity_head_dim
    backends = ["blockwise", "sdpa"] + (["flash"] if flash_attn_available() and device.type == "cuda" else [])
    partitions = {"uniform": uniform_partition(S, cfg.chunks),
                  "uneven": [S // 2, S // 4, S // 8, S - S // 2 - S // 4 - S // 8][: cfg.chunks]}
    if sum(partitions["uneven"]) != S:
        partitions.pop("uneven")
    for kv_heads in (H, max(1, H // 4)):
        g_ = torch.Generator(device="cpu").manual_seed(0)
        q64 = torch.randn(1, H, S, D, generator=g_, dtype=torch.float64).to(device)
        k64 = torch.randn(1, kv_heads, S, D, generator=g_, dtype=torch.float64).to(device)
        v64 = torch.randn(1, kv_heads, S, D, generator=g_, dtype=torch.float64).to(device)
        g64 = torch.randn(1, H, S, D, generator=g_, dtype=torch.float64).to(device)
        ref = _full_attention(q64, k64, v64, g64)
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, g = (t.to(dtype) for t in (q64, k64, v64, g64))
            base = _rel_err(_full_attention(q, k, v, g), ref)
            for backend in backends:
                if backend == "flash" and (dtype == torch.float32 or kv_heads != H):
                    continue
                for pname, lengths in partitions.items():
                    err = _rel_err(_chunked_attention(backend, q, k, v, g, lengths), ref)
                    tol = 2 * base + (1e-5 if dtype == torch.float32 else 2e-3)
                    rows.append(dict(dtype=str(dtype).replace("torch.", ""), backend=backend, kv_heads=kv_heads,
                                     partition=pname, lengths=lengths, rel_err=err, unchunked_rel_err=base,
                                     ok=err <= tol))
        del q64, k64, v64, g64, ref
    return rows


# Document layouts of the documents check, as fractions of the sequence (one per batch
# row; more rows repeat them shifted): boundaries fall inside chunks, and the rows differ,
# so a tile's query rows cropped to the union leave some rows of one batch row empty.
DOC_FRACTIONS = ([0.17, 0.37, 0.07, 0.22, 0.17], [0.3, 0.45, 0.25])


def _document_ids(S: int, batch: int, device: torch.device) -> torch.Tensor:
    rows = []
    for b in range(batch):
        fr = DOC_FRACTIONS[b % len(DOC_FRACTIONS)]
        lens = [max(1, round(f * S)) for f in fr[:-1]]
        lens.append(S - sum(lens))
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        rows.append(ids.roll(b // len(DOC_FRACTIONS)))
    return torch.stack(rows).to(device)


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` after one warm-up, and its peak extra CUDA bytes (None on CPU)."""
    fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device) - base)
    return sorted(times)[len(times) // 2], peak


def section_documents(cfg: GpuCheckConfig, device: torch.device) -> dict:
    S, H, D, B = cfg.parity_seq, cfg.parity_heads, cfg.parity_head_dim, cfg.doc_batch
    kv_heads = max(1, H // 4)
    ids = _document_ids(S, B, device)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    mask = (ids[:, None, :, None] == ids[:, None, None, :]) & causal
    lengths_u = uniform_partition(S, cfg.chunks)
    partitions = {"uniform": lengths_u, "uneven": [S // 2, S // 4, S // 8, S - S // 2 - S // 4 - S // 8]}
    if cfg.chunks != 4:
        partitions.pop("uneven")
    g_ = torch.Generator(device="cpu").manual_seed(1)
    shapes = ((B, H, S, D), (B, kv_heads, S, D), (B, kv_heads, S, D), (B, H, S, D))
    q64, k64, v64, g64 = (torch.randn(sh, generator=g_, dtype=torch.float64).to(device) for sh in shapes)
    ref = _full_attention(q64, k64, v64, g64, mask)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, g = (t.to(dtype) for t in (q64, k64, v64, g64))
        base = _rel_err(_full_attention(q, k, v, g, mask), ref)
        for pname, lengths in partitions.items():
            with kernels._record_kernels() as counts:
                err = _rel_err(_chunked_attention("blockwise", q, k, v, g, lengths, ids), ref)
            tol = 2 * base + (1e-5 if dtype == torch.float32 else 2e-3)
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), partition=pname, lengths=lengths,
                             kv_heads=kv_heads, rel_err=err, unchunked_rel_err=base, ok=err <= tol,
                             masked_tiles={kind: n for (kind, masked), n in sorted(counts.items()) if masked},
                             unmasked_tiles={kind: n for (kind, masked), n in sorted(counts.items()) if not masked}))
    del q64, k64, v64, g64, ref, mask
    dtype = getattr(torch, cfg.dtype)
    q, k, v, g = (torch.randn(sh, generator=g_, dtype=torch.float32).to(device, dtype) for sh in shapes)
    timing = []
    for case, doc in (("causal", None), ("documents", ids)):
        sec, peak = _timed(lambda doc=doc: _chunked_attention("blockwise", q, k, v, g, lengths_u, doc),
                           cfg.repeats, device)
        timing.append(dict(case=case, dtype=cfg.dtype, lengths=lengths_u, ms=sec * 1e3,
                           peak_mib=None if peak is None else peak / 2**20))
    return dict(parity=rows, timing=timing)


def _grads(stack: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in stack.parameters()]


def _blocks_backward(stack: nn.Module, x: torch.Tensor, g: torch.Tensor, lengths: list[int] | None,
                     store: WeightGradStore | None = None) -> tuple[float, float]:
    """Forward and backward of ``stack`` (a ModuleList of blocks) on ``x``: unchunked
    (``lengths`` None) or chunk by chunk as Seq1F1B runs one micro-batch on a stage. With a
    ``store``, each chunk's backward is I (its weight products captured) and all the W
    passes run after the last I. Returns the seconds of the backward (B, or I) and of W."""
    device = x.device
    for p in stack.parameters():
        p.grad = None

    def run(h):
        for block in stack:
            h = block(h)
        return h

    if lengths is None:
        out = run(x)
        _sync(device)
        t0 = time.perf_counter()
        out.backward(g)
        _sync(device)
        return time.perf_counter() - t0, 0.0
    k = len(lengths)
    offs = [sum(lengths[:j]) for j in range(k)]
    cache = KVCache()
    outs = []
    for j in range(k):
        with chunk_context(ChunkContext(0, j, k, offs[j], lengths[j], cache)):
            outs.append(run(x[:, offs[j]:offs[j] + lengths[j]]))
    runners = []
    _sync(device)
    t0 = time.perf_counter()
    for j in reversed(range(k)):
        with chunk_context(ChunkContext(0, j, k, offs[j], lengths[j], cache, recompute=True)):
            if store is None:
                outs[j].backward(g[:, offs[j]:offs[j] + lengths[j]])
            else:
                with store.capture():  # as SequencePipelineStage.backward_one_chunk(full_backward=False)
                    outs[j].backward(g[:, offs[j]:offs[j] + lengths[j]])
                    runners.append(store.take())
    _sync(device)
    t1 = time.perf_counter()
    if store is not None and any(p.grad is not None for p in store.covered_parameters()):
        raise AssertionError("I computed weight gradients the store covers: the W pass was not deferred")
    for w in runners:
        w()
    _sync(device)
    cache.drop(0)
    return t1 - t0, time.perf_counter() - t1


def section_weight_grad(cfg: GpuCheckConfig, device: torch.device) -> dict:
    H, D, S = cfg.parity_heads, cfg.parity_head_dim, cfg.parity_seq
    model = _layers_gpt(n_layers=cfg.wgrad_layers, dim=H * D, n_heads=H)
    torch.manual_seed(0)
    with torch.device(device):
        ref_stack = nn.ModuleList([Block(model) for _ in range(cfg.wgrad_layers)]).double()
    g_ = torch.Generator(device="cpu").manual_seed(2)
    x64 = torch.randn(1, S, model.dim, generator=g_, dtype=torch.float64).to(device)
    g64 = torch.randn(1, S, model.dim, generator=g_, dtype=torch.float64).to(device)
    _blocks_backward(ref_stack, x64, g64, None)
    ref = _grads(ref_stack)
    lengths = uniform_partition(S, cfg.chunks)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        stack = copy.deepcopy(ref_stack).to(dtype)
        x, g = x64.to(dtype), g64.to(dtype)
        _blocks_backward(stack, x, g, None)
        base = _rel_err(_grads(stack), ref)
        _blocks_backward(stack, x, g, lengths)
        full = _grads(stack)
        store = WeightGradStore()
        covered = store.attach(stack)
        try:
            _blocks_backward(stack, x, g, lengths, store)
        finally:
            store.detach()
        split = _grads(stack)
        err, err_b = _rel_err(split, ref), _rel_err(full, ref)
        tol = 2 * max(base, err_b) + (1e-5 if dtype == torch.float32 else 2e-3)
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), lengths=lengths, covered_params=covered,
                         rel_err=err, b_rel_err=err_b, unchunked_rel_err=base,
                         i_w_vs_b=_rel_err(split, [t.double() for t in full]), ok=err <= tol))
        del stack
    del ref_stack, ref
    # I+W against B in the compute dtype.
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        stack = nn.ModuleList([Block(model) for _ in range(cfg.wgrad_layers)]).to(dtype)
    x, g = x64.to(dtype), g64.to(dtype)
    del x64, g64
    b_times, i_times, w_times = [], [], []
    store = WeightGradStore()
    for r in range(cfg.repeats + 1):  # the first is a warm-up
        tb, _ = _blocks_backward(stack, x, g, lengths)
        store.attach(stack)
        try:
            ti, tw = _blocks_backward(stack, x, g, lengths, store)
        finally:
            store.detach()
        if r:
            b_times.append(tb)
            i_times.append(ti)
            w_times.append(tw)
    med = lambda ts: sorted(ts)[len(ts) // 2]  # noqa: E731
    b, i, w = med(b_times), med(i_times), med(w_times)
    return dict(parity=rows, timing=dict(dtype=cfg.dtype, lengths=lengths, layers=cfg.wgrad_layers, dim=model.dim,
                                         b_ms=b * 1e3, i_ms=i * 1e3, w_ms=w * 1e3, i_plus_w_over_b=(i + w) / b))


# -------------------------------------------------------------------- 2. chunk times
def section_chunk_times(cfg: GpuCheckConfig, device: torch.device) -> dict:
    stack = _stack(cfg, cfg.model.n_layers, device)
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(1, cfg.seq_len, cfg.model.dim, device=device, dtype=dtype)
    t0 = time.perf_counter()
    samples = [(s, e, time_chunk(stack, x, length=s, end=e, repeats=cfg.calib_repeats))
               for s, e in default_samples(cfg.seq_len, multiple_of=64 if cfg.seq_len >= 4096 else 8)]
    cost = fit_chunk_cost(samples, diagonal=True)
    mult = 64 if cfg.seq_len >= 4096 else 8
    partitions = {"full": [cfg.seq_len]}
    for name in PARTITION_NAMES:  # resolved in one place, partition.resolve_partition
        partitions[name] = resolve_partition(name, cfg.seq_len, cfg.chunks, flop_model=flop_model(cfg.model),
                                             calibrated=cost, multiple_of=mult)
    calib_s = time.perf_counter() - t0
    entries, rows = {}, []
    for name, lengths in partitions.items():
        time_chunks(stack, x, lengths, repeats=1)  # warm-up: kernels and allocator for these shapes
        f, b = time_chunks(stack, x, lengths, repeats=cfg.repeats)
        tot = [a + c for a, c in zip(f, b)]
        entries[name if name == "full" else f"{name}@{cfg.chunks}"] = dict(lengths=lengths, fwd=f, bwd=b)
        rows.append(dict(partition=name, lengths=lengths, chunk_ms=[round(t * 1e3, 1) for t in tot],
                         total_ms=sum(tot) * 1e3, max_over_mean=max(tot) / (sum(tot) / len(tot))))
    del stack, x
    return dict(rows=rows, partitions=entries, calibration=dict(
        coefficients=asdict(cost), seconds=calib_s,
        samples=[dict(length=s, end=e, seconds=t) for s, e, t in samples]))


# ------------------------------------------------------------------- 3. stage memory
def _run_order(stack, ops, lengths, cfg: GpuCheckConfig, device: torch.device) -> float:
    """Drive ``stack`` through one stage's (kind, unit) list; peak extra bytes."""
    dtype = getattr(torch, cfg.dtype)
    k = len(lengths)
    offs = [sum(lengths[:j]) for j in range(k)]
    cache = KVCache()
    for p in stack.parameters():
        p.grad = torch.zeros_like(p)
    live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    meter = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        meter = ActivationMemoryMeter(modules=[stack], kv_cache=cache).__enter__()
        base = 0
    try:
        for kind, u in ops:
            n, j = divmod(u, k)
            if kind == "F":
                # The activation the previous stage would have sent.
                x = torch.randn(1, lengths[j], cfg.model.dim, device=device, dtype=dtype, requires_grad=True)
                with chunk_context(ChunkContext(n, j, k, offs[j], lengths[j], cache)):
                    live[u] = (x, stack(x))
            else:
                x, out = live.pop(u)
                with chunk_context(ChunkContext(n, j, k, offs[j], lengths[j], cache, recompute=True)):
                    out.backward(torch.randn_like(out))
                del x, out  # the input gradient would be sent on and freed
                if j == 0:
                    cache.drop(n)
        if meter is not None:
            meter.sample()
    finally:
        if meter is not None:
            meter.__exit__(None, None, None)
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device) - base)
    return float(meter.peak_bytes)


def section_stage_memory(cfg: GpuCheckConfig, device: torch.device) -> list[dict]:
    stack = _stack(cfg, cfg.mem_layers, device)
    p, m, k, S = cfg.pp, cfg.microbatches, cfg.chunks, cfg.seq_len
    mult = 64 if S >= 4096 else 8
    runs = {
        "1F1B": (schedule_ir.compute_order(p, 0, m, 1), [S]),
        "Seq1F1B uniform": (schedule_ir.compute_order(p, 0, m, k), uniform_partition(S, k)),
        "Seq1F1B balanced": (schedule_ir.compute_order(p, 0, m, k), resolve_partition(
            "balanced", S, k, flop_model=flop_model(replace(cfg.model, n_layers=cfg.mem_layers)), multiple_of=mult)),
    }
    rows = []
    for name, (ops, lengths) in runs.items():
        peak = _run_order(stack, ops, lengths, cfg, device)
        rows.append(dict(schedule=name, lengths=lengths, peak_gib=peak / GIB,
                         peak_live_units=schedule_ir.peak_live_units(ops)))
    ref = rows[0]["peak_gib"]
    base_units = expected_peak([(kind, 0, u) for kind, u in runs["1F1B"][0]], {0: (1.0, 0.0)}, [S])
    for r, (ops, lengths) in zip(rows, runs.values()):
        r["vs_1F1B"] = r["peak_gib"] / ref if ref else math.nan
        # Live tokens at the peak over 1F1B's, K/V-gradient relay left out: (p+k-1)/(kp) when uniform.
        r["ideal_vs_1F1B"] = expected_peak([(kind, 0, u) for kind, u in ops], {0: (1.0, 0.0)}, lengths) / base_units
    del stack
    return rows


# --------------------------------------------------------------------- 4. simulator
def section_simulate(cfg: GpuCheckConfig, entries: dict) -> list[dict]:
    rows = []
    base_plan = simulate.build_schedule_ops("1F1B", pp=cfg.pp, microbatches=cfg.microbatches)
    base = simulate.simulate(base_plan, simulate.measured_costs(base_plan, entries["full"]))
    for name in ("uniform", "balanced", "calibrated"):
        key = f"{name}@{cfg.chunks}"
        if key not in entries:
            continue
        plan = simulate.build_schedule_ops("Seq1F1B", pp=cfg.pp, microbatches=cfg.microbatches, chunks=cfg.chunks)
        res = simulate.simulate(plan, simulate.measured_costs(plan, entries[key]))
        rows.append(dict(partition=name, seq_makespan_s=res.makespan, seq_bubble=res.bubble,
                         f1b_makespan_s=base.makespan, f1b_bubble=base.bubble,
                         speedup_vs_1F1B=base.makespan / res.makespan))
    return rows


# ------------------------------------------------------------------------------ main
def run_checks(cfg: GpuCheckConfig, device: torch.device, *, budget_s: float = 280.0) -> dict:
    """Run the sections; every failure is recorded, not raised."""
    t_start = time.perf_counter()
    report: dict = dict(config=asdict(cfg), device=str(device), sections={})

    def run(name, fn, *a):
        elapsed = time.perf_counter() - t_start
        if elapsed > budget_s:
            report["sections"][name] = dict(status="skipped", reason=f"time budget spent ({elapsed:.0f} s)")
            return None
        t0 = time.perf_counter()
        try:
            out = fn(*a)
            report["sections"][name] = dict(status="ok", seconds=time.perf_counter() - t0, result=out)
            return out
        except Exception as exc:  # noqa: BLE001 - a section's failure is a finding, not a crash
            report["sections"][name] = dict(status="failed", seconds=time.perf_counter() - t0,
                                            error=f"{type(exc).__name__}: {exc}",
                                            traceback=traceback.format_exc(limit=6))
            logger.warning("section %s failed: %s", name, exc)
            return None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    run("parity", section_parity, cfg, device)
    run("documents", section_documents, cfg, device)
    run("weight_grad", section_weight_grad, cfg, device)
    times = run("chunk_times", section_chunk_times, cfg, device)
    run("stage_memory", section_stage_memory, cfg, device)
    if times is not None:
        run("simulate", section_simulate, cfg, times["partitions"])
    else:
        report["sections"]["simulate"] = dict(status="skipped", reason="no measured chunk times")
    report["seconds"] = time.perf_counter() - t_start
    if device.type == "cuda":
        report["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return report


def _table(report: dict) -> list[dict]:
    rows = []
    for name, sec in report["sections"].items():
        if sec["status"] != "ok":
            rows.append(dict(section=name, item=sec["status"], value=sec.get("error") or sec.get("reason")))
            continue
        res = sec["result"]
        if name == "parity":
            bad = [r for r in res if not r["ok"]]
            worst = max(res, key=lambda r: r["rel_err"] / max(r["unchunked_rel_err"], 1e-12))
            rows.append(dict(section=name, item=f"{len(res) - len(bad)}/{len(res)} cases within tolerance",
                             value=f"worst {worst['backend']} {worst['dtype']} kv={worst['kv_heads']}: "
                                   f"{worst['rel_err']:.2e} vs unchunked {worst['unchunked_rel_err']:.2e}"))
        elif name == "documents":
            par = res["parity"]
            bad = [r for r in par if not r["ok"]]
            worst = max(par, key=lambda r: r["rel_err"] / max(r["unchunked_rel_err"], 1e-12))
            kinds = sorted({kind for r in par for kind in r["masked_tiles"]})
            rows.append(dict(section=name, item=f"{len(par) - len(bad)}/{len(par)} cases within tolerance",
                             value=f"worst {worst['dtype']} {worst['partition']}: {worst['rel_err']:.2e} vs "
                                   f"unchunked {worst['unchunked_rel_err']:.2e}; masked tiles ran "
                                   f"{'/'.join(kinds) or 'nothing'}"))
            t = {r["case"]: r for r in res["timing"]}
            mem = {c: "" if t[c]["peak_mib"] is None else f", peak {t[c]['peak_mib']:.0f} MiB" for c in t}
            rows.append(dict(section=name, item=f"fwd+bwd {t['documents']['dtype']} {t['documents']['lengths']}",
                             value=f"documents {t['documents']['ms']:.1f} ms{mem['documents']} vs causal "
                                   f"{t['causal']['ms']:.1f} ms{mem['causal']}"))
        elif name == "weight_grad":
            for r in res["parity"]:
                rows.append(dict(section=name, item=f"I+W grads {r['dtype']} {r['lengths']}"
                                                    f"{'' if r['ok'] else ' NOT within tolerance'}",
                                 value=f"rel err {r['rel_err']:.2e} (B {r['b_rel_err']:.2e}, unchunked "
                                       f"{r['unchunked_rel_err']:.2e}); I+W vs B {r['i_w_vs_b']:.1e}"))
            t = res["timing"]
            rows.append(dict(section=name, item=f"{t['layers']} blocks dim {t['dim']} {t['dtype']} {t['lengths']}",
                             value=f"I+W {t['i_ms'] + t['w_ms']:.1f} ms (I {t['i_ms']:.1f}, W {t['w_ms']:.1f}) "
                                   f"vs B {t['b_ms']:.1f} ms: {t['i_plus_w_over_b']:.3f}"))
        elif name == "chunk_times":
            for r in res["rows"]:
                rows.append(dict(section=name, item=f"{r['partition']} {r['lengths']}",
                                 value=f"chunks {r['chunk_ms']} ms, total {r['total_ms']:.0f} ms, "
                                       f"max/mean {r['max_over_mean']:.3f}"))
        elif name == "stage_memory":
            for r in res:
                ideal = f" (ideal {r['ideal_vs_1F1B']:.3f})" if r["schedule"] != "1F1B" else ""
                rows.append(dict(section=name, item=f"{r['schedule']} {r['lengths']}",
                                 value=f"peak {r['peak_gib']:.3f} GiB, {r['vs_1F1B']:.3f} x 1F1B{ideal}"))
        elif name == "simulate":
            for r in res:
                rows.append(dict(section=name, item=f"Seq1F1B {r['partition']} vs 1F1B",
                                 value=f"speed-up {r['speedup_vs_1F1B']:.3f}, bubble {r['seq_bubble']:.3f} "
                                       f"vs {r['f1b_bubble']:.3f}"))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].replace("``", "")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU (what the tests run)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else outputs/bench)")
    parser.add_argument("--budget-s", type=float, default=280.0,
                        help="skip the remaining sections after this many seconds (default 280)")
    parser.add_argument("--seq-len", type=int, help="override the sequence length")
    parser.add_argument("--layers", type=int, help="override the chunk-timing stack depth")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        cfg, device = SMOKE, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench gpu needs a CUDA device; use --smoke for the CPU toy run")
        cfg, device = GpuCheckConfig(), torch.device("cuda")
    if args.seq_len:
        cfg = replace(cfg, seq_len=args.seq_len)
    if args.layers:
        cfg = replace(cfg, model=replace(cfg.model, n_layers=args.layers))
    if cfg.seq_len % cfg.chunks:
        raise SystemExit(f"--seq-len {cfg.seq_len} must be divisible by k={cfg.chunks}")
    meta = dict(env=env_info(), flash_attn=flash_attn_available())
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # toy sizes: thread-pool wake-ups would dominate the timings
    try:
        report = run_checks(cfg, device, budget_s=args.budget_s)
    finally:
        torch.set_num_threads(threads)
    table = _table(report)
    path = out_dir(args)
    parts = report["sections"].get("chunk_times", {}).get("result", {}) or {}
    # simulate --times reads "partitions"; the timed stack is one stage's worth of layers.
    jpath, _ = write_results(path, "gpu", table, meta, report=report, partitions=parts.get("partitions", {}),
                             scope="stage")
    print(f"bench gpu on {meta['env'].get('gpu', 'cpu')}, torch {torch.__version__}, "
          f"{report['seconds']:.0f} s; wrote {jpath}")
    print_table(table, ["section", "item", "value"])
    failed = [n for n, s in report["sections"].items() if s["status"] == "failed"]
    return 1 if failed else 0
