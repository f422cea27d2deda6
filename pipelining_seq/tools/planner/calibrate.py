"""``plan --calibrate``: run one stage here and compare its measured memory with the plan.

The stage is driven through its action list in one process, as the pipeline runtime
would drive it; on CPU the measure is :class:`~pipelining_seq.tools.memory.ActivationMemoryMeter`
(saved tensors + K/V cache), on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ... import schedule_ir
from ...models.gpt import GPT, GPTConfig, balanced_partition_for
from .activations import ActivationModel
from .plan import replay

__all__ = ["CALIBRATION_SIZES", "calibrate", "run_calibration"]

CALIBRATION_SIZES = {"cuda": (4096, 32, 16384, 2), "cpu": (128, 4, 512, 2)}
"""dim, heads, seq_len, layers of the default calibration per device."""


def calibrate(
    *,
    model: GPTConfig,
    n_layers: int,
    pp: int,
    stage: int,
    n_microbatches: int,
    chunk_lengths: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    batch: int = 1,
    whole_model: bool = False,
) -> dict:
    """Measure one pipeline stage of ``n_layers`` blocks against the planner's prediction.

    The stage is driven through its Seq1F1B action list in one process (received
    activations and output gradients are random tensors, as a middle stage sees them).
    ``whole_model`` runs a whole GPT of ``n_layers`` instead (embedding, blocks, norm,
    output and a cross-entropy loss: a stage that is first and last at once).
    On CPU the measure is :class:`ActivationMemoryMeter` (saved tensors + K/V), compared
    with the planner's saved + K/V bytes; on CUDA it is ``torch.cuda.max_memory_allocated``
    above the parameters, compared with the planner's activations + K/V + transient.
    """
    from ...context import ChunkContext, KVCache, chunk_context
    from ...models.gpt import Block
    from ..memory import ActivationMemoryMeter

    dev = torch.device(device)
    k = len(chunk_lengths)
    offsets = [sum(chunk_lengths[:j]) for j in range(k)]
    torch.manual_seed(0)
    if whole_model:
        stack = GPT(dataclasses.replace(model, n_layers=n_layers)).to(dev, dtype)
    else:
        stack = torch.nn.Sequential(*[Block(model) for _ in range(n_layers)]).to(dev, dtype)
    for p in stack.parameters():
        p.grad = torch.zeros_like(p)
    ops = schedule_ir.compute_order(pp, stage, n_microbatches, k)
    cache = KVCache()
    live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    meter = ActivationMemoryMeter(modules=[stack], kv_cache=cache) if dev.type == "cpu" else None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    if meter is not None:
        meter.__enter__()
    try:
        for kind, u in ops:
            n, j = divmod(u, k)
            if kind == "F":
                shape = (batch, chunk_lengths[j])
                if whole_model:
                    x = torch.randint(0, model.vocab_size, shape, device=dev)
                else:
                    x = torch.randn(*shape, model.dim, device=dev, dtype=dtype, requires_grad=True)
                with chunk_context(ChunkContext(n, j, k, offsets[j], chunk_lengths[j], cache)):
                    out = stack(x)
                    if whole_model:  # the stage keeps its output (the logits) next to the loss
                        loss = torch.nn.functional.cross_entropy(out.float().flatten(0, 1), x.flatten())
                        out = (out, loss)
                live[u] = (x, out)
            else:
                x, out = live.pop(u)
                with chunk_context(ChunkContext(n, j, k, offsets[j], chunk_lengths[j], cache, recompute=True)):
                    if whole_model:
                        out[1].backward()
                    else:
                        out.backward(torch.randn_like(out))
                del x, out
                if j == 0:
                    cache.drop(n)
    finally:
        if meter is not None:
            meter.__exit__(None, None, None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        measured = torch.cuda.max_memory_allocated(dev) - base
    else:
        measured = meter.peak_bytes
    # A bare block stack never recomputes (only GPT.forward checkpoints its blocks).
    run_model = model if whole_model else dataclasses.replace(model, activation_checkpoint=False)
    am = ActivationModel(model=run_model, act_bytes=dtype.itemsize, device=dev.type)
    cpu = dev.type == "cpu"

    def kv_of(j: int) -> int:
        return n_layers * (am.kv_bytes(chunk_lengths[j], batch) + am.kv_concat(offsets[j] + chunk_lengths[j], j, batch))

    def unit(j: int) -> int:
        s = chunk_lengths[j]
        io = 0 if cpu else am.stage_io(s, first=whole_model, last=whole_model, batch=batch)
        ends = am.embed_saved(s, batch) + am.head_saved(s, batch) if whole_model else 0
        return n_layers * am.layer_saved(s, j, batch) + kv_of(j) + io + ends

    def dkv(j: int) -> int:
        return n_layers * sum(am.kv_bytes(chunk_lengths[i], batch) for i in range(j))

    def transient(j: int) -> int:
        if cpu:
            return 0
        s = chunk_lengths[j]
        if whole_model:
            return am.layer_transient(s, batch) + am.head_transient(s, batch)
        return am.layer_transient(s, batch) + batch * s * model.dim * am.act_bytes  # + the output gradient

    one = lambda f: lambda _stage, j: f(j)  # noqa: E731 - one stage: the byte functions ignore it
    act, kv, trans, tag = replay(
        [(kind, stage, u) for kind, u in ops], k, one(unit), one(kv_of), one(dkv), one(dkv), one(transient),
        at_backward=not cpu,
    )
    predicted = act + kv + trans
    return dict(
        device=dev.type, dtype=str(dtype).removeprefix("torch."), chunk_lengths=list(chunk_lengths),
        live_units=schedule_ir.peak_live_units(ops), measured_bytes=int(measured), predicted_bytes=int(predicted),
        ratio=predicted / measured if measured else float("nan"), peak_action=tag,
    )


def run_calibration(*, device: str, dtype: torch.dtype, dim: int, heads: int, seq_len: int, layers: int) -> list[dict]:
    """The calibration cases of ``plan --calibrate``: 1F1B and Seq1F1B (k=4, balanced) on
    stage 0 of p=4 with m=4, for a middle-stage block stack and for a whole GPT."""
    k, pp, m = 4, 4, 4
    cfg = GPTConfig(vocab_size=50304 if device == "cuda" else 512, n_layers=layers, dim=dim, n_heads=heads)
    balanced = balanced_partition_for(cfg, seq_len, k, multiple_of=64 if seq_len >= 4096 else 8)
    rows = []
    for whole in (False, True):
        for name, lengths in (("1F1B", [seq_len]), ("Seq1F1B", balanced)):
            r = calibrate(model=cfg, n_layers=layers, pp=pp, stage=0, n_microbatches=m, chunk_lengths=lengths,
                          dtype=dtype, device=device, whole_model=whole)
            rows.append(dict(case=f"{'whole GPT' if whole else 'block stack'} {name}", **r))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows
