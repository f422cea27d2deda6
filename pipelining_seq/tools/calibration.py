"""Measured chunk costs: profile, fit, re-partition (the ``linear_fit`` idea of Seq1F1B v2).

The FLOP model behind :func:`~pipelining_seq.partition.balanced_partition`
(:mod:`pipelining_seq.flops`) counts FLOPs, not how fast each kernel really runs
(fused attention vs GEMMs, the causal diagonal block, small GQA/SwiGLU matmuls). Here the cost of a chunk of ``s`` tokens ending at position ``P`` is
fitted to measured forward+backward times,

    cost(s, P) = a1·(s·P − s²/2) + a2·s + b   (+ a3·s² with ``diagonal=True``),

and the chunks are re-cut by the same last-to-first equalisation as the FLOP model.
The extra ``a3·s²`` term lets the causal diagonal block cost more (or less) than
half of a full block, which on CPU it does.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..context import ChunkContext, KVCache, chunk_context

__all__ = [
    "LinearChunkCost",
    "default_samples",
    "fit_chunk_cost",
    "linear_fit_partition",
    "time_chunk",
    "time_chunks",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearChunkCost:
    """Fitted ``cost(s, P) = a1·(sP − s²/2) + a3·s² + a2·s + b`` (seconds)."""

    a1: float
    """Per (query, earlier key) pair: attention over the prefix and the causal triangle."""
    a2: float
    """Per token: projections, MLP, norms, embedding and head."""
    b: float
    """Per chunk: launch and bookkeeping overhead."""
    a3: float = 0.0
    """Extra per (query, key) pair of the diagonal block (0 for the paper's form)."""

    def predict(self, length: float, end: float) -> float:
        s, p = length, end
        return self.a1 * (s * p - s * s / 2) + self.a3 * s * s + self.a2 * s + self.b

    def balanced_partition(self, seq_len: int, n_chunks: int, *, multiple_of: int = 1) -> list[int]:
        """Chunk lengths of equal fitted cost (:func:`linear_fit_partition`): what
        ``seq_partition="calibrated"`` resolves to with ``calibrated=`` this cost model."""
        return linear_fit_partition(seq_len, n_chunks, self, multiple_of=multiple_of)


def fit_chunk_cost(samples: Sequence[tuple[int, int, float]], *, diagonal: bool = False) -> LinearChunkCost:
    """Non-negative least-squares fit of ``(length, end, seconds)`` samples (relative error).

    Coefficients are kept >= 0 (a term that fits negative is dropped and the rest
    refitted), so the fitted cost never falls as a chunk grows, which the partition
    solver relies on; noise-dominated timings degrade to fewer terms, not to nonsense.
    """
    names = ["a1", "a2", "b"] + (["a3"] if diagonal else [])
    if len(samples) < len(names):
        raise ValueError(f"fit_chunk_cost needs at least {len(names)} samples, got {len(samples)}")
    feats, ys = [], []
    for s, p, t in samples:
        if not 0 < s <= p or t <= 0:
            raise ValueError(f"sample (length={s}, end={p}, time={t}): need 0 < length <= end and time > 0")
        row = {"a1": s * p - s * s / 2, "a2": float(s), "b": 1.0, "a3": float(s * s)}
        # Divide by t so short chunks count as much as long ones (relative error).
        feats.append([row[n] / t for n in names])
        ys.append(1.0)
    active = list(range(len(names)))
    coef = dict.fromkeys(names, 0.0)
    while active:
        a = torch.tensor([[r[i] for i in active] for r in feats], dtype=torch.float64)
        sol = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
        if min(sol) >= 0:
            coef.update({names[i]: c for i, c in zip(active, sol)})
            break
        active.pop(sol.index(min(sol)))
    return LinearChunkCost(a1=coef["a1"], a2=coef["a2"], b=coef["b"], a3=coef.get("a3", 0.0))


def _lengths_for_target(seq_len: int, n_chunks: int, cost: LinearChunkCost, target: float) -> list[float] | str:
    """Continuous lengths with chunks k-1..1 costing ``target`` each, the first taking the rest.

    Returns ``"low"`` if no chunk can be that cheap, ``"high"`` if the chunks overflow.
    """
    qa = cost.a3 - cost.a1 / 2
    parts: list[float] = []
    end = float(seq_len)
    for _ in range(n_chunks - 1):
        qb = cost.a1 * end + cost.a2
        qc = cost.b - target
        # Smallest positive root of qa·s² + qb·s + qc = 0 (cost grows with s up to s = end).
        if abs(qa) < 1e-30:
            s = -qc / qb
        else:
            disc = qb * qb - 4 * qa * qc
            if disc < 0:
                return "low" if qc > 0 else "high"
            roots = [(-qb + sign * math.sqrt(disc)) / (2 * qa) for sign in (1, -1)]
            positive = [r for r in roots if r > 0]
            if not positive:
                return "low"
            s = min(positive)
        if s <= 0:
            return "low"
        if s >= end:
            return "high"
        parts.insert(0, s)
        end -= s
    return [end, *parts]


def linear_fit_partition(
    seq_len: int, n_chunks: int, cost: LinearChunkCost, *, multiple_of: int = 1
) -> list[int]:
    """Chunk lengths (first to last) of equal fitted cost, solved from the last chunk back.

    For a given per-chunk target the chunks are cut from the end of the sequence, each
    as long as the target allows, and the first chunk takes the rest; the target is
    bisected until the first chunk costs the same as the others. (With ``a3 = 0`` this
    is the paper's closed form, whose target is ``(cost(S, S) + (k-1)·b) / k``.)
    """
    if n_chunks < 1 or seq_len < n_chunks * multiple_of:
        raise ValueError(
            f"cannot cut {seq_len} tokens into {n_chunks} chunks of at least {multiple_of}: "
            "lower n_chunks or multiple_of"
        )
    if n_chunks == 1:
        return [seq_len]
    if cost.predict(seq_len, seq_len) - cost.b <= 0:  # no size-dependent cost: any cut is equal
        base, extra = divmod(seq_len // multiple_of, n_chunks)
        return [(base + (j < extra)) * multiple_of + (seq_len % multiple_of if j == 0 else 0) for j in range(n_chunks)]
    lo, hi = 0.0, cost.predict(seq_len, seq_len) + n_chunks * abs(cost.b)
    best = None
    for _ in range(200):
        mid = (lo + hi) / 2
        parts = _lengths_for_target(seq_len, n_chunks, cost, mid)
        if parts == "low":
            lo = mid
        elif parts == "high" or cost.predict(parts[0], parts[0]) < mid:
            hi = mid  # later chunks took too much: lower the target
        else:
            lo, best = mid, parts
    if best is None:
        raise ValueError(f"linear_fit_partition: no equal-cost split of {seq_len} tokens for {cost}")
    out: list[int] = []
    end = seq_len
    for s in reversed(best[1:]):
        remaining = n_chunks - 1 - len(out)
        r = int(round(s / multiple_of)) * multiple_of
        r = min(max(multiple_of, r), end - remaining * multiple_of)
        out.insert(0, r)
        end -= r
    return [end, *out]


def default_samples(seq_len: int, *, multiple_of: int = 8) -> list[tuple[int, int]]:
    """A small (length, end) design covering short/long chunks early and late in the sequence."""

    def rnd(x: float) -> int:
        return max(multiple_of, int(x // multiple_of) * multiple_of)

    out = []
    for frac in (1 / 16, 1 / 8, 1 / 4, 1 / 2):
        s = rnd(seq_len * frac)
        for end in (s, rnd((s + seq_len) / 2), seq_len):
            if (s, end) not in out and end >= s:
                out.append((s, end))
    out.append((seq_len, seq_len))
    return out


def _backward(out: torch.Tensor, loss_fn: Callable | None, target: torch.Tensor | None) -> None:
    if loss_fn is not None:
        loss_fn(out, target).backward()
    else:
        out.backward(torch.ones_like(out))


def time_chunk(
    module: nn.Module,
    inputs: torch.Tensor,
    *,
    length: int,
    end: int,
    loss_fn: Callable | None = None,
    target: torch.Tensor | None = None,
    repeats: int = 3,
    seq_dim: int = 1,
) -> float:
    """Median forward+backward seconds of the chunk ``[end-length, end)`` of ``inputs``.

    The prefix runs first as chunk 0 (untimed, so the chunk sees a real K/V cache);
    then the chunk's forward and backward are timed together.
    """
    if not 0 < length <= end <= inputs.shape[seq_dim]:
        raise ValueError(f"time_chunk(length={length}, end={end}): need 0 < length <= end <= {inputs.shape[seq_dim]}")
    start = end - length

    def piece(t: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
        return None if t is None else t.narrow(seq_dim, a, b - a).contiguous()

    times = []
    for _ in range(repeats):
        cache = KVCache()
        n = 2 if start else 1
        if start:
            with chunk_context(ChunkContext(0, 0, n, 0, start, cache)):
                prefix = module(piece(inputs, 0, start))
        x, y = piece(inputs, start, end), piece(target, start, end)
        _sync(inputs)
        t0 = time.perf_counter()
        ctx = ChunkContext(0, n - 1, n, start, length, cache)
        with chunk_context(ctx):
            out = module(x)
        with chunk_context(ChunkContext(0, n - 1, n, start, length, cache, recompute=True)):
            _backward(out, loss_fn, y)
        _sync(inputs)
        times.append(time.perf_counter() - t0)
        del out
        if start:
            del prefix
        cache.clear()
    return statistics.median(times)


def time_chunks(
    module: nn.Module,
    inputs: torch.Tensor,
    lengths: Sequence[int],
    *,
    loss_fn: Callable | None = None,
    target: torch.Tensor | None = None,
    repeats: int = 3,
    seq_dim: int = 1,
) -> tuple[list[float], list[float]]:
    """Median forward and backward seconds of each chunk, run as Seq1F1B runs them.

    All chunks go forward in order, then backward in reverse order, as one
    micro-batch does on one stage.
    """
    k = len(lengths)
    offs = [sum(lengths[:j]) for j in range(k)]
    fwd: list[list[float]] = [[] for _ in range(k)]
    bwd: list[list[float]] = [[] for _ in range(k)]
    for _ in range(repeats):
        cache = KVCache()
        outs = []
        for j in range(k):
            x = inputs.narrow(seq_dim, offs[j], lengths[j]).contiguous()
            _sync(inputs)
            t0 = time.perf_counter()
            with chunk_context(ChunkContext(0, j, k, offs[j], lengths[j], cache)):
                outs.append(module(x))
            _sync(inputs)
            fwd[j].append(time.perf_counter() - t0)
        for j in reversed(range(k)):
            y = None if target is None else target.narrow(seq_dim, offs[j], lengths[j]).contiguous()
            t0 = time.perf_counter()
            with chunk_context(ChunkContext(0, j, k, offs[j], lengths[j], cache, recompute=True)):
                _backward(outs[j], loss_fn, y)
            _sync(inputs)
            bwd[j].append(time.perf_counter() - t0)
            outs[j] = None
        cache.clear()
    return [statistics.median(t) for t in fwd], [statistics.median(t) for t in bwd]


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
