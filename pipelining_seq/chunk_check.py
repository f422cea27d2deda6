"""Does a module compute the same thing in sequence chunks as on the whole sequence?

Seq1F1B is exact only for a model that keeps the chunk contract: attention through
:class:`~pipelining_seq.ChunkedCausalAttention` (one instance per layer) and positions from
:func:`~pipelining_seq.chunk_positions`. The attention guard refuses known attention kernels
called behind its back, but no list of calls catches a hand-written softmax, a causal mask
built over the chunk alone, or positions restarting at 0 in every chunk: those train on
plausible, wrong losses. What does catch them is the definition itself: a module that keeps
the contract gives, on its chunks run in order, the outputs it gives on the whole sequence.

* :func:`check_chunking` runs that comparison on one module in one process: the module on
  its k chunks in unit order inside the package's chunk context (exactly as a stage runs
  them, attention guard included), then on the whole sequence, every submodule's output
  recorded by forward hooks. It returns a :class:`ChunkingReport` (the largest difference
  per submodule) and raises :class:`~pipelining_seq.ContractError` when the module's
  output differs, naming the first submodule (in execution order) whose outputs differ.
* In the schedules (``verify_chunking=True``, the default) each stage records the inputs
  and outputs of its chunked forwards of micro-batch 0 on the first training step and on
  the first eval, and :func:`pipelining_seq.stage_check.verify` then runs one extra whole-sequence forward of the same
  inputs (no gradient, outside any chunk context, K/V caches untouched), compares, agrees on
  the verdict with one small ``all_gather`` over the pipeline group, and raises the same
  ``ContractError`` on every rank before the step returns (so before any optimizer step).
  Only when the stage's outputs differ does it replay the chunks with hooks to name the
  first differing submodule: the passing check keeps one micro-batch's stage inputs and
  outputs, not every submodule's activations. Later steps cost nothing.

Tolerance. Outputs are compared as ``max |chunked - whole| <= rtol * max |whole|`` per
tensor, ``rtol`` from the working precision (:func:`relative_tolerance`). Chunked and whole
runs differ legitimately only by rounding: other matrix shapes, and attention merged from
blocks by log-sum-exp instead of one softmax. The contract mistakes change what is computed:
a chunk attending only to itself, or keys rotated at the wrong positions, move outputs by
1e-4 to 1e-1 of their scale even at initialisation, where attention is nearly uniform.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from . import _compat
from .attention import ChunkedCausalAttention
from .context import ChunkContext, ContractError, KVCache, chunk_context, current_chunk
from .guard import chunked_unit
from .partition import SeqPartition, resolve_partition

__all__ = [
    "ChunkingReport",
    "ModuleDiff",
    "check_chunking",
    "relative_tolerance",
]

logger = logging.getLogger(__name__)

# Relative tolerance per working precision (max |chunked - whole| / max |whole|).
# Measured chunked-vs-whole rounding (tests/test_chunk_check.py, the reference GPT with
# documents, MLA, GQA, compile and activation checkpointing, the shipped CPU recipes):
# float64 below 1e-14, float32 below 2e-6, bfloat16 below 4e-2 of the output scale. The
# contract mistakes give 1e-4 and more in float32/float64. Each bound sits well above the
# measured noise (x ~100 for float32, room for deeper and trained models) and below the
# smallest mistake: float32 3e-5, float64 1e-9. Half precisions carry ~8 (bf16) or ~11
# (fp16) mantissa bits and rounding differences of a few units in the last place
# accumulate over the layers: 0.1 (bf16), 2e-2 (fp16), 5e-3 (TF32 matmuls), catching
# gross mistakes only; run check_chunking in float32 or float64 to see small ones.
_RTOL = {
    "float64": 1e-9,
    "float32": 3e-5,
    "tf32": 5e-3,
    "float16": 2e-2,
    "bfloat16": 1e-1,
}
_RANK = {"float64": 0, "float32": 1, "tf32": 2, "float16": 3, "bfloat16": 4}  # larger = coarser

CAUSES = (
    "attention not computed by pipelining_seq.ChunkedCausalAttention (a hand-written softmax, or a causal "
    "mask built over the chunk alone, sees only its own chunk); positions not from "
    "pipelining_seq.chunk_positions (each chunk restarting at 0, e.g. arange of the chunk's length); a "
    "sliding window or attention mask that ChunkedCausalAttention is not told about; dropout or other "
    "randomness in training mode; a sequence-global operation (a mean or a norm over the sequence)"
)


def _precision_name(dtype: torch.dtype, device_type: str) -> str | None:
    if dtype == torch.float64:
        return "float64"
    if dtype == torch.float32:
        # torch.set_float32_matmul_precision / allow_tf32 let float32 matmuls round to
        # TF32 (CUDA) or bfloat16 ("medium"): compare at what the matmuls keep.
        prec = torch.get_float32_matmul_precision()
        if device_type == "cuda" and (prec != "highest" or torch.backends.cuda.matmul.allow_tf32):
            return "bfloat16" if prec == "medium" else "tf32"
        if prec == "medium":
            return "bfloat16"
        return "float32"
    if dtype == torch.bfloat16:
        return "bfloat16"
    if dtype == torch.float16:
        return "float16"
    if dtype.is_floating_point:  # float8 and the like
        return "bfloat16"
    return None


def relative_tolerance(*dtypes: torch.dtype, device_type: str = "cpu") -> tuple[float, str]:
    """(rtol, precision name) for tensors computed in ``dtypes`` (the coarsest decides;
    autocast's dtype is added by the callers when it is on)."""
    names = [n for n in (_precision_name(d, device_type) for d in dtypes) if n is not None] or ["float32"]
    name = max(names, key=_RANK.__getitem__)
    return _RTOL[name], name


def _context_dtypes(module: nn.Module, device_type: str) -> list[torch.dtype]:
    """Floating dtypes the module computes in: its parameters' and autocast's."""
    dtypes = {p.dtype for p in module.parameters() if p.dtype.is_floating_point}
    if torch.is_autocast_enabled(device_type):
        dtypes.add(torch.get_autocast_dtype(device_type))
    return sorted(dtypes, key=str)


# ---------------------------------------------------------------- nested outputs
def _leaves(obj: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Tensors of a nested tuple/list/dict (HF ModelOutput is a dict) with their paths."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{path}[{k!r}]")]
    if isinstance(obj, (tuple, list)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{path}[{i}]")]
    return []


def _detach(obj: Any, *, clone: bool = False) -> Any:
    """A nested tuple/list/dict with its tensors detached (and cloned); other containers
    (a dict subclass such as HF's ModelOutput included) become plain ones."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if clone else obj.detach()
    if isinstance(obj, dict):
        return {k: _detach(v, clone=clone) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(v, clone=clone) for v in obj) if type(obj) in (tuple, list) else \
            tuple(_detach(v, clone=clone) for v in obj)
    return obj


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor (tensor parallelism) is compared whole: every rank of its mesh runs the
    # same comparisons in the same order, so the gather is matched.
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _seq_dim(chunks: Sequence[torch.Tensor], whole: torch.Tensor, lengths: Sequence[int], prefer: int) -> int | None:
    """The dimension along which ``chunks`` concatenate to ``whole``'s shape (None if none)."""
    total = sum(lengths)
    found = []
    for d in range(whole.dim()):
        if whole.shape[d] != total:
            continue
        if all(
            c.dim() == whole.dim() and c.shape[d] == n
            and all(c.shape[e] == whole.shape[e] for e in range(whole.dim()) if e != d)
            for c, n in zip(chunks, lengths)
        ):
            found.append(d)
    if not found:
        return None
    return prefer if prefer in found else found[0]


def _concat_dim(values: Sequence[torch.Tensor], lengths: Sequence[int], prefer: int) -> int | None:
    """The dimension along which chunk inputs were split (their lengths on it are ``lengths``)."""
    ref = values[0]
    found = [
        d for d in range(ref.dim())
        if all(v.dim() == ref.dim() and v.shape[d] == n for v, n in zip(values, lengths))
        and all(v.shape[e] == ref.shape[e] for v in values for e in range(ref.dim()) if e != d)
    ]
    if not found:
        return None
    return prefer if prefer in found else found[0]


def _max_diff(chunked: torch.Tensor, whole: torch.Tensor) -> tuple[float, float]:
    """(max |chunked - whole|, max |whole|) over finite values; a NaN/inf where the other
    side has none counts as an infinite difference."""
    a, b = chunked.detach(), whole.detach()
    if not a.dtype.is_floating_point and not a.dtype.is_complex:
        return (0.0 if torch.equal(a, b) else float("inf")), 1.0
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(work), b.to(work)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    same_nonfinite = (~fa & ~fb) & ((a == b) | (torch.isnan(a) & torch.isnan(b)))
    if bool(((fa != fb) | (~fa & ~fb & ~same_nonfinite)).any()):
        return float("inf"), float(b[fb].abs().max()) if bool(fb.any()) else 0.0
    if not bool(fa.any()):
        return 0.0, 0.0
    return float((a[fa] - b[fa]).abs().max()), float(b[fb].abs().max())


# ---------------------------------------------------------------------- reports
@dataclass
class ModuleDiff:
    """The largest difference between a (sub)module's chunked and whole outputs."""

    name: str
    """Qualified submodule name; "" is the checked module itself."""
    call: int
    """Which call of the submodule within one forward (0 unless it runs several times)."""
    max_diff: float
    """max |chunked - whole| over its sequence-shaped output tensors."""
    scale: float
    """max |whole|: the tolerance is relative to it."""
    rtol: float
    """Relative tolerance of the working precision."""
    precision: str
    """Working precision the tolerance was chosen for."""

    @property
    def tol(self) -> float:
        """Absolute tolerance, ``rtol * scale``."""
        return self.rtol * self.scale

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tol

    @property
    def label(self) -> str:
        base = self.name or "(module output)"
        return base if self.call == 0 else f"{base} (call {self.call})"

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "DIFFERS"
        return (
            f"{self.label}: max diff {self.max_diff:.3g} {'<=' if self.ok else '>'} tol {self.tol:.3g} "
            f"({self.rtol:g} x max |whole| {self.scale:.3g}, {self.precision}) {verdict}"
        )


@dataclass
class ChunkingReport:
    """Result of :func:`check_chunking` (and of a stage's check inside a schedule)."""

    n_seq_chunks: int
    lengths: list[int]
    output: ModuleDiff | None
    """The checked module's own output (None when it has no sequence-shaped tensor)."""
    modules: list[ModuleDiff] = field(default_factory=list)
    """Every submodule whose output has a sequence dimension, in execution order."""
    not_compared: list[str] = field(default_factory=list)
    """Submodules not looked into: compiled (hooks would change their graphs) or without
    a sequence-shaped output."""
    seconds: float = 0.0
    where: str = "module"

    @property
    def first_mismatch(self) -> ModuleDiff | None:
        """The first submodule (execution order) whose chunked and whole outputs differ."""
        return next((d for d in self.modules if not d.ok), None)

    @property
    def ok(self) -> bool:
        if self.output is not None:
            return self.output.ok
        return self.first_mismatch is None

    @property
    def max_diff(self) -> float:
        return self.output.max_diff if self.output is not None else max((d.max_diff for d in self.modules), default=0.0)

    def __str__(self) -> str:
        head = (
            f"chunk-exactness of {self.where}: {'ok' if self.ok else 'MISMATCH'}, {self.n_seq_chunks} chunks "
            f"{self.lengths}, {self.seconds * 1e3:.0f} ms"
        )
        lines = [head]
        if self.output is not None:
            lines.append(f"  output  {self.output}")
        first = self.first_mismatch
        if first is not None:
            lines.append(f"  first differing submodule: {first.label}")
        lines += [f"  {d}" for d in self.modules if d.name]
        if self.not_compared:
            lines.append(f"  not compared: {', '.join(self.not_compared)}")
        return "\n".join(lines)


_INPUTS = " (inputs q, k, v)"


def _mismatch_message(report: ChunkingReport, *, what: str, hint: str) -> str:
    first = report.first_mismatch
    out = report.output
    if first is not None and first.name.endswith(_INPUTS):
        hint = (
            "Every submodule before this ChunkedCausalAttention agrees and its q/k/v inputs differ: most likely the "
            "positions (RoPE) come from arange of the chunk instead of pipelining_seq.chunk_positions(seq_len, "
            "device). " + hint
        )
    where = (
        f"first differing submodule: {first.label} (max |chunked - whole| {first.max_diff:.3g} > tolerance "
        f"{first.tol:.3g} = {first.rtol:g} x max |whole| {first.scale:.3g}, {first.precision})"
        if first is not None and first.name else
        "no submodule could be singled out"
        + (f" (not looked into: {', '.join(report.not_compared)})" if report.not_compared else "")
    )
    diff = (
        f"outputs differ by {out.max_diff:.3g} > tolerance {out.tol:.3g} ({out.rtol:g} x max |whole| "
        f"{out.scale:.3g}, {out.precision})" if out is not None else "outputs differ"
    )
    return (
        f"{what}: computed in {report.n_seq_chunks} sequence chunks {report.lengths} its {diff} from the same "
        f"inputs run as one whole sequence, so Seq1F1B would train on silently wrong numbers; {where}. "
        f"Likely causes: {CAUSES}. {hint}"
    )


# ------------------------------------------------------------- no side effects
@contextlib.contextmanager
def _unchanged(module: nn.Module, device: torch.device | str | None = None) -> Iterator[None]:
    """Run extra forwards without a trace: buffers (BatchNorm statistics, MoE token counts
    that feed a load-balancing update) and the random number generators are restored."""
    saved = [
        (m, name, buf, buf.detach().clone())
        for m in module.modules() for name, buf in m.named_buffers(recurse=False) if buf is not None
    ]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices = [dev] if dev.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=dev.type if devices else "cuda"):
        try:
            yield
        finally:
            with torch.no_grad():
                for m, name, buf, value in saved:
                    if getattr(m, name, None) is not buf:
                        setattr(m, name, buf)
                    buf.copy_(value)
            # FSDP2 leaves a module unsharded after a forward when reshard_after_forward is
            # off: its parameters would then be the unsharded ones, without the step's
            # gradients, until the next reshard. Put the sharded ones back.
            for m in module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


# ------------------------------------------------------------------- recording
def _is_compiled(m: nn.Module) -> bool:
    return _compat.is_compiled_module(m)


class _Recorder:
    """Forward hooks on every submodule outside compiled regions: per chunk (or the
    whole run) the outputs of each (name, call)."""

    def __init__(self, module: nn.Module) -> None:
        self.runs: list[dict[tuple[str, int], Any]] = []
        self.order: list[tuple[str, int]] = []
        self.skipped: list[str] = []
        self._handles = []
        compiled: list[str] = []
        for name, sub in module.named_modules():
            if any(name.startswith(c) for c in compiled):
                continue  # inside a compiled module: hooks would enter (and change) its graph
            if _is_compiled(sub):
                compiled.append(f"{name}." if name else "")
                self.skipped.append(f"{name or '(module)'} (compiled)")
                continue
            if isinstance(sub, ChunkedCausalAttention):
                # Its inputs too: rotated q/k that already differ point at the positions.
                self._handles.append(sub.register_forward_pre_hook(self._hook(name + _INPUTS, inputs=True)))
            self._handles.append(sub.register_forward_hook(self._hook(name)))

    def _hook(self, name: str, *, inputs: bool = False) -> Callable:
        def hook(mod: nn.Module, args: Any, out: Any = None) -> None:
            if inputs:
                out = args
            run = self.runs[-1]
            counts = self._counts
            call = counts.get(name, 0)
            counts[name] = call + 1
            run[(name, call)] = _detach(out)
            if self._record_order:
                self.order.append((name, call))
        return hook

    def begin(self, *, record_order: bool = False) -> None:
        self.runs.append({})
        self._counts: dict[str, int] = {}
        self._record_order = record_order

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _compare_tree(chunk_outs: Sequence[Any], whole: Any, lengths: Sequence[int], prefer: int) -> tuple[float, float, torch.dtype | None] | None:
    """(max diff, max scale, dtype) over the sequence-shaped tensors of one output."""
    whole_leaves = _leaves(whole)
    chunk_leaves = [dict(_leaves(c)) for c in chunk_outs]
    diff = scale = 0.0
    dtype = None
    compared = False
    for path, w in whole_leaves:
        parts = [c.get(path) for c in chunk_leaves]
        if any(p is None for p in parts):
            continue
        w, parts = _local(w), [_local(p) for p in parts]
        d = _seq_dim(parts, w, lengths, prefer)
        if d is None:
            continue
        md, sc = _max_diff(torch.cat(parts, dim=d), w)
        # The worst ratio decides; keep its scale for the message.
        if not compared or md / max(sc, 1e-300) > diff / max(scale, 1e-300):
            diff, scale = md, sc
        dtype = w.dtype if dtype is None else dtype
        compared = True
    return (diff, scale, dtype) if compared else None


def _module_diffs(
    rec: _Recorder, lengths: Sequence[int], prefer: int, rtol_for: Callable[[torch.dtype], tuple[float, str]]
) -> tuple[list[ModuleDiff], list[str]]:
    *chunk_runs, whole_run = rec.runs
    diffs, not_compared = [], []
    for key in rec.order:
        name, call = key
        if not all(key in run for run in chunk_runs):
            not_compared.append(f"{name or '(module)'} (called a different number of times per chunk)")
            continue
        got = _compare_tree([run[key] for run in chunk_runs], whole_run[key], lengths, prefer)
        if got is None:
            continue
        md, sc, dtype = got
        rtol, prec = rtol_for(dtype)
        diffs.append(ModuleDiff(name=name, call=call, max_diff=md, scale=sc, rtol=rtol, precision=prec))
    return diffs, not_compared


def _run_chunks(module: nn.Module, unit_args: Sequence[tuple], unit_kwargs: Sequence[dict], lengths: Sequence[int],
                *, where: str, before: Callable[[], None] | None = None) -> list[Any]:
    """The module on its chunks in unit order, each inside its chunk context (a private
    K/V cache) and the attention guard, as a stage runs micro-batch 0."""
    cache = KVCache()
    outs = []
    offset = 0
    k = len(lengths)
    try:
        for j, n in enumerate(lengths):
            ctx = ChunkContext(microbatch=0, chunk=j, n_chunks=k, offset=offset, length=n, cache=cache)
            if before is not None:
                before()
            with chunk_context(ctx), chunked_unit(n_chunks=k, where=f"{where}'s chunk {j}"):
                outs.append(module(*unit_args[j], **unit_kwargs[j]))
            offset += n
    finally:
        cache.clear()
    return outs


def _compare_module(
    module: nn.Module, unit_args: Sequence[tuple], unit_kwargs: Sequence[dict], whole_args: tuple,
    whole_kwargs: dict, lengths: Sequence[int], *, prefer: int, where: str, device_type: str,
) -> ChunkingReport:
    """Chunks then whole, both with every submodule's output recorded."""
    t0 = time.perf_counter()
    extra = _context_dtypes(module, device_type)

    def rtol_for(dtype: torch.dtype | None) -> tuple[float, str]:
        return relative_tolerance(*([dtype] if dtype is not None else []), *extra, device_type=device_type)

    rec = _Recorder(module)
    try:
        with _unchanged(module, _device_of(module)):
            chunk_outs = _run_chunks(module, unit_args, unit_kwargs, lengths, where=where, before=rec.begin)
            rec.begin(record_order=True)
            with torch.no_grad():
                whole_out = module(*whole_args, **whole_kwargs)
    finally:
        rec.remove()
    diffs, not_compared = _module_diffs(rec, lengths, prefer, rtol_for)
    output = None
    got = _compare_tree([_detach(o) for o in chunk_outs], whole_out, lengths, prefer)
    if got is not None:
        md, sc, dtype = got
        rtol, prec = rtol_for(dtype)
        output = ModuleDiff(name="", call=0, max_diff=md, scale=sc, rtol=rtol, precision=prec)
    not_compared = rec.skipped + not_compared
    return ChunkingReport(
        n_seq_chunks=len(lengths), lengths=list(lengths), output=output, modules=diffs, not_compared=not_compared,
        seconds=time.perf_counter() - t0, where=where,
    )


# ------------------------------------------------------------- single process
def _seq_len(args: tuple, kwargs: dict, seq_dim: int) -> int:
    found = [
        (name, t.shape[seq_dim]) for name, t in [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
        if isinstance(t, torch.Tensor) and t.dim() > seq_dim
    ]
    if not found:
        raise ValueError(
            f"check_chunking: no input tensor has a dimension seq_dim={seq_dim} to cut into chunks: pass the "
            "module's inputs ([batch, seq, ...] tensors) and the sequence dimension"
        )
    lengths = {n for _, n in found}
    if len(lengths) > 1:
        raise ValueError(f"check_chunking: inputs disagree on the sequence length along seq_dim={seq_dim}: {found}")
    return found[0][1]


def _split(value: Any, lengths: list[int], seq_dim: int) -> list[Any]:
    total = sum(lengths)
    if isinstance(value, torch.Tensor) and value.dim() > seq_dim and value.shape[seq_dim] == total:
        return [c.contiguous() for c in torch.split(value, lengths, dim=seq_dim)]
    return [value] * len(lengths)


def check_chunking(
    module: nn.Module,
    *args: Any,
    n_seq_chunks: int,
    seq_partition: SeqPartition = "uniform",
    seq_dim: int = 1,
    **kwargs: Any,
) -> ChunkingReport:
    """Check in one process that ``module`` gives the same outputs on sequence chunks as on
    the whole sequence: the first thing to run on a model new to Seq1F1B.

    ``args``/``kwargs`` are the module's inputs (a stage module's: token ids for the first
    stage, hidden states for the others, ``document_ids=...`` and the like as keywords).
    Every tensor with the sequence length along ``seq_dim`` is cut into ``n_seq_chunks``
    chunks (lengths from ``seq_partition``, as the schedules cut them); other values go to
    every chunk unchanged. The module runs on the chunks in order inside the package's
    chunk context (a private K/V cache, the attention guard on), exactly as a stage runs a
    micro-batch, with the caller's grad mode; then once on the whole inputs without
    gradient. Forward hooks record every submodule's outputs (not inside compiled modules).

    Run it in the mode you train in (``module.train()``: dropout is randomness the check
    reports). Returns a :class:`ChunkingReport`; raises
    :class:`~pipelining_seq.ContractError` when the module's outputs differ beyond the
    working precision's tolerance, naming the first differing submodule.
    """
    if not isinstance(n_seq_chunks, int) or isinstance(n_seq_chunks, bool) or n_seq_chunks < 1:
        raise ValueError(f"check_chunking: n_seq_chunks={n_seq_chunks!r} must be a positive integer")
    if current_chunk() is not None:
        raise RuntimeError("check_chunking: called inside a Seq1F1B unit; call it outside any pipeline step")
    seq_len = _seq_len(args, kwargs, seq_dim)
    lengths = resolve_partition(seq_partition, seq_len, n_seq_chunks)
    name = type(module).__name__
    if n_seq_chunks == 1:
        return ChunkingReport(n_seq_chunks=1, lengths=lengths, output=None, where=name,
                              not_compared=["one chunk: nothing to compare"])
    cols = [_split(a, lengths, seq_dim) for a in args]
    kcols = {key: _split(v, lengths, seq_dim) for key, v in kwargs.items()}
    unit_args = [tuple(c[j] for c in cols) for j in range(n_seq_chunks)]
    unit_kwargs = [{key: c[j] for key, c in kcols.items()} for j in range(n_seq_chunks)]
    device_type = _device_type(module, args, kwargs)
    report = _compare_module(
        module, unit_args, unit_kwargs, args, kwargs, lengths, prefer=seq_dim, where=name, device_type=device_type,
    )
    if not report.ok:
        raise ContractError(_mismatch_message(
            report, what=f"check_chunking({name})",
            hint="Fix the model, then run check_chunking again; print(report) lists every submodule's difference.",
        ))
    return report


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _device_type(module: nn.Module, args: tuple, kwargs: dict) -> str:
    for t in (*module.parameters(), *args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"
