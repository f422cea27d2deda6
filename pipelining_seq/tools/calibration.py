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
from dataclasses import asdict, dataclass

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


def _greedy_cuts(seq_len: int, cost: LinearChunkCost, target: float, multiple_of: int) -> list[int] | None:
    """Chunk lengths (first to last) cut from the end, each as long as ``target`` allows.

    Every chunk but the first is a multiple of ``multiple_of``; the first takes the
    rest (at least ``multiple_of``). ``None`` when some chunk cannot be that cheap.
    Chunk costs grow when a chunk is extended on either side (every coefficient is
    >= 0), so this greedy cut needs the fewest chunks of any split whose chunks all
    cost at most ``target``.
    """
    parts: list[int] = []
    end = seq_len
    while cost.predict(end, end) > target:
        most = (end - multiple_of) // multiple_of  # leave at least multiple_of tokens before
        if most < 1 or cost.predict(multiple_of, end) > target:
            return None
        lo, hi = 1, most  # largest u with cost(u*multiple_of, end) <= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost.predict(mid * multiple_of, end) <= target:
                lo = mid
            else:
                hi = mid - 1
        parts.insert(0, lo * multiple_of)
        end -= lo * multiple_of
    return [end, *parts]


def linear_fit_partition(
    seq_len: int, n_chunks: int, cost: LinearChunkCost, *, multiple_of: int = 1
) -> list[int]:
    """Chunk lengths (first to last) whose most expensive chunk is as cheap as possible.

    Every coefficient of ``cost`` must be >= 0 (what :func:`fit_chunk_cost` returns).
    The lowest per-chunk cost bound that ``n_chunks`` chunks can meet is bisected; for
    it, the chunks are cut from the end of the sequence, each as long as the bound
    allows, and the first chunk takes the rest, so the chunks cost about the same (with
    ``a3 = 0`` and ``multiple_of=1`` this is the paper's closed form, up to rounding).
    Chunks are multiples of ``multiple_of`` except the first, which also takes
    ``seq_len % multiple_of``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"linear_fit_partition: seq_len={seq_len!r} must be a positive int")
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"linear_fit_partition: n_chunks={n_chunks!r} must be a positive int")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"linear_fit_partition: multiple_of={multiple_of!r} must be a positive int")
    bad = {n: v for n, v in asdict(cost).items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"linear_fit_partition: cost coefficients {bad} must be finite and >= 0 ({cost})")
    if seq_len < n_chunks * multiple_of:
        raise ValueError(
            f"cannot cut {seq_len} tokens into {n_chunks} chunks of at least {multiple_of}: "
            "lower n_chunks or multiple_of"
        )
    if n_chunks == 1:
        return [seq_len]
    if cost.predict(seq_len, seq_len) - cost.b <= 0:  # no size-dependent cost: any cut is equal
        base, extra = divmod(seq_len // multiple_of, n_chunks)
        return [(base + (j < extra)) * multiple_of + (seq_len % multiple_of if j == 0 else 0) for j in range(n_chunks)]
    # Bisect the bound: ``hi`` always admits a split into n_chunks chunks or fewer, ``lo`` none.
    lo, hi = 0.0, cost.predict(seq_len, seq_len)
    for _ in range(200):
        mid = (lo + hi) / 2
        if not lo < mid < hi:
            break
        parts = _greedy_cuts(seq_len, cost, mid, multiple_of)
        if parts is not None and len(parts) <= n_chunks:
            hi = mid
        else:
            lo = mid
    parts = _greedy_cuts(seq_len, cost, hi, multiple_of)
    assert parts is not None and len(parts) <= n_chunks
    # Fewer chunks met the bound: halve the longest chunks (never dearer) until there are n_chunks.
    while len(parts) < n_chunks:
        j = max(range(len(parts)), key=lambda i: (parts[i] - (seq_len % multiple_of if i == 0 else 0), -i))
        units = (parts[j] - (seq_len % multiple_of if j == 0 else 0)) // multiple_of
        tail = (units // 2) * multiple_of
        parts[j:j + 1] = [parts[j] - tail, tail]
    return parts


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
