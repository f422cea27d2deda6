"""The chunk-exactness check inside the Seq1F1B schedules (``verify_chunking=True``).

Each stage records the inputs and outputs of its chunked forwards of micro-batch 0 on the
first training step and the first eval (:class:`StageCheck`, attached by :func:`setup`);
:func:`verify` then runs one whole-sequence forward of the same inputs, compares
(:mod:`pipelining_seq.chunk_check`), agrees on the verdict with one small ``all_gather`` over
the pipeline group, and raises the same :class:`~pipelining_seq.ContractError` on every rank
before the step returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import _compat
from .chunk_check import (
    ChunkingReport,
    ModuleDiff,
    _compare_module,
    _compare_tree,
    _concat_dim,
    _context_dtypes,
    _detach,
    _mismatch_message,
    _unchanged,
    relative_tolerance,
)
from .context import ChunkContext, ContractError

__all__ = ["StageCheck", "setup", "summary_line", "verify"]

logger = logging.getLogger("pipelining_seq.chunk_check")  # one logger name for the check's lines


# ------------------------------------------------------------------- in-schedule
class StageCheck:
    """One stage's part of the in-schedule check: what its forwards of micro-batch 0
    receive and return on the first step of each kind ("step", "eval"), and the verdict.

    The stage calls :meth:`wants` and :meth:`record` from ``forward_maybe_with_nosync``
    (the call torch's ``forward_one_chunk`` makes with the unit's composite inputs), so
    backward recomputation (activation checkpointing) and torch's shape inference are never
    recorded.
    """

    def __init__(self, stage: Any, *, seq_dim: int) -> None:
        self.stage = stage
        self.seq_dim = seq_dim
        self.pending = {"step", "eval"}
        self.kind: str | None = None
        self.lengths: list[int] = []
        self._inputs: list[Any] = []  # per chunk: (args, kwargs), tensors cloned
        self._split: list[bool] = []  # per input leaf: whether chunks got different objects
        self._first: list[Any] = []  # chunk 0's input leaves (held, so identities stay unique)
        self._outputs: list[Any] = []

    # --- recording (inside the step) ---
    def arm(self, *, kind: str, lengths: Sequence[int]) -> None:
        """Called by the stage when a step's chunking is set."""
        self.kind = kind if kind in self.pending and len(lengths) > 1 else None
        self.lengths = list(lengths)
        self._clear()

    def wants(self, ctx: ChunkContext | None) -> bool:
        return self.kind is not None and ctx is not None and ctx.microbatch == 0 and not ctx.recompute \
            and ctx.chunk == len(self._outputs)

    def record(self, forward: Callable[[], Any], args: tuple, kwargs: dict) -> Any:
        leaves = _flat((args, kwargs))
        if not self._first:
            self._first, self._split = leaves, [False] * len(leaves)
        elif len(leaves) != len(self._first):
            raise ContractError(
                f"stage {self.stage.stage_index}: chunk {len(self._outputs)} of micro-batch 0 got {len(leaves)} "
                f"inputs, chunk 0 got {len(self._first)}: every chunk must get the same inputs"
            )
        else:
            self._split = [s or x is not f for s, x, f in zip(self._split, leaves, self._first)]
        # Cloned before the forward: a model may write into its inputs.
        self._inputs.append(_detach((args, kwargs), clone=True))
        out = forward()
        self._outputs.append(_detach(out))
        return out

    # --- the verdict (after the step) ---
    def _whole_inputs(self) -> tuple[tuple, dict]:
        flat = [_flat(inp) for inp in self._inputs]
        merged = []
        for i, first in enumerate(flat[0]):
            values = [f[i] for f in flat]
            if not self._split[i] or not all(isinstance(v, torch.Tensor) for v in values):
                merged.append(first)  # the same object in every chunk: not cut
                continue
            d = _concat_dim(values, self.lengths, self.seq_dim)
            if d is None:
                raise RuntimeError(
                    f"input {i} of the stage's chunks has shapes {[tuple(v.shape) for v in values]}, which do not "
                    f"concatenate to a sequence of {sum(self.lengths)} tokens"
                )
            merged.append(torch.cat(values, dim=d))
        return _unflat(self._inputs[0], merged)

    def finish(self) -> tuple[ChunkingReport | None, str | None]:
        """Run the whole-sequence forward and compare: (report, error message or None)."""
        kind, self.kind = self.kind, None
        if kind is None:
            return None, None
        self.pending.discard(kind)
        k = len(self.lengths)
        if len(self._outputs) != k:
            self._clear()
            return None, None
        stage = self.stage
        where = f"stage {stage.stage_index}"
        device_type = torch.device(stage.device).type
        t0 = time.perf_counter()
        args, kwargs = self._whole_inputs()
        with torch.no_grad(), _unchanged(stage.submod, stage.device):
            whole = stage.submod(*args, **kwargs)
        extra = _context_dtypes(stage.submod, device_type)
        got = _compare_tree(self._outputs, whole, self.lengths, self.seq_dim)
        del whole
        output = None
        if got is not None:
            md, sc, dtype = got
            rtol, prec = relative_tolerance(*([dtype] if dtype is not None else []), *extra, device_type=device_type)
            output = ModuleDiff(name="", call=0, max_diff=md, scale=sc, rtol=rtol, precision=prec)
        report = ChunkingReport(n_seq_chunks=k, lengths=self.lengths, output=output, where=where)
        if not report.ok:
            # Name the first differing submodule: replay micro-batch 0's chunks (no
            # gradient, a private K/V cache) and the whole run with every submodule hooked.
            unit_args = [inp[0] for inp in self._inputs]
            unit_kwargs = [inp[1] for inp in self._inputs]
            with torch.no_grad():
                detail = _compare_module(
                    stage.submod, unit_args, unit_kwargs, args, kwargs, self.lengths, prefer=self.seq_dim,
                    where=where, device_type=device_type,
                )
            report.modules, report.not_compared = detail.modules, detail.not_compared
        report.seconds = time.perf_counter() - t0
        self._clear()
        if report.ok:
            return report, None
        what = f"Seq1F1B chunk-exactness check, stage {stage.stage_index} (first {'training step' if kind == 'step' else 'eval'})"
        hint = (
            "Run pipelining_seq.check_chunking(stage_module, inputs, n_seq_chunks=k) in one process to see every "
            "submodule's difference; pass verify_chunking=False to the schedule to skip this check (at the risk "
            "of wrong losses)."
        )
        return report, _mismatch_message(report, what=what, hint=hint)

    def _clear(self) -> None:
        self._inputs, self._split, self._first, self._outputs = [], [], [], []


def _flat(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _flat(v)]
    if isinstance(obj, (tuple, list)):
        return [x for v in obj for x in _flat(v)]
    return [obj]


def _unflat(template: Any, values: list[Any]) -> Any:
    it = iter(values)

    def build(t: Any) -> Any:
        if isinstance(t, dict):
            return {k: build(v) for k, v in t.items()}
        if isinstance(t, (tuple, list)):
            return type(t)(build(v) for v in t) if type(t) in (tuple, list) else tuple(build(v) for v in t)
        return next(it)

    return build(template)


# ----------------------------------------------------------- schedule wiring
def setup(owner: str, stages: Sequence[Any], *, n_seq_chunks: int, enabled: bool) -> None:
    """A schedule's constructor: refuse stages built by torch's tracer front end when the
    micro-batches are cut into chunks, and attach (or detach) each stage's check."""
    if not isinstance(enabled, bool):
        raise TypeError(f"{owner}: verify_chunking={enabled!r} must be True or False")
    if n_seq_chunks > 1:
        for s in stages:
            kind = _compat.traced_stage_kind(s)
            if kind is not None:
                raise TypeError(
                    f"{owner}(n_seq_chunks={n_seq_chunks}): stage {getattr(s, 'stage_index', '?')} was built by "
                    f"torch's tracer front end ({kind}). A traced stage has the sequence length of the trace baked "
                    "into its reshapes and its attention traced as a plain whole-sequence kernel, so it cannot run "
                    "on sequence chunks. Build the stage module by hand (the model's own layers for this stage, "
                    "attention through pipelining_seq.ChunkedCausalAttention and positions from chunk_positions) and "
                    "wrap it in pipelining_seq.SequencePipelineStage(module, stage_index, num_stages, device); "
                    "pipelining_seq.check_chunking(module, inputs, n_seq_chunks=k) tells whether it runs exactly in "
                    "chunks. Or keep the traced stage with n_seq_chunks=1 (plain 1F1B)."
                )
    from .stage import SequencePipelineStage

    for s in stages:
        if isinstance(s, SequencePipelineStage):
            s._chunk_check = StageCheck(s, seq_dim=getattr(s, "activation_seq_dim", 1)) if enabled and n_seq_chunks > 1 else None


def verify(schedule: Any, stages: Sequence[Any]) -> None:
    """After a step's units ran: each stage's verdict on its first step / eval, agreed by
    every rank of the pipeline group with one small ``all_gather``; raises the same
    :class:`~pipelining_seq.ContractError` on every rank when a stage's chunked outputs
    differ. A no-op once both kinds are checked (and when the check is off)."""
    checks = [s._chunk_check for s in stages if getattr(s, "_chunk_check", None) is not None]
    if not checks or all(c.kind is None for c in checks):
        return
    rows, messages = [], []
    for c in checks:
        try:
            report, msg = c.finish()
        except Exception as e:  # noqa: BLE001 - every rank must reach the collective below
            logger.exception("stage %s: the chunk-exactness check could not run", c.stage.stage_index)
            report, msg = None, (
                f"Seq1F1B chunk-exactness check, stage {c.stage.stage_index}: the whole-sequence forward of "
                f"micro-batch 0 failed ({type(e).__name__}: {e}); the check compares the stage's chunked outputs "
                "with the same module run on the whole sequence. Pass verify_chunking=False to the schedule to "
                "skip it"
            )
        status = 0.0 if msg is None else 1.0
        rows.append([status, float(c.stage.stage_index),
                     report.max_diff if report is not None else float("nan"),
                     report.output.tol if report is not None and report.output is not None else float("nan"),
                     report.seconds if report is not None else float("nan")])
        if msg is not None:
            messages.append(msg)
    stage = checks[0].stage
    table = _gather_rows(rows, stage)
    schedule.chunk_check_results = [
        dict(stage=int(r[1]), ok=r[0] == 0, max_diff=r[2], tol=r[3], seconds=r[4]) for r in table
    ]
    if all(r[0] == 0 for r in table):
        # Once per pipeline (its first rank): the trainer's and torchtitan's logs show it.
        if not dist.is_initialized() or dist.get_rank(stage.group) == 0:
            logger.info("%s", summary_line(schedule))
        return
    if dist.is_initialized() and dist.get_world_size(stage.group) > 1:
        everyone: list[Any] = [None] * dist.get_world_size(stage.group)
        dist.all_gather_object(everyone, messages, group=stage.group)
        messages = [m for ms in everyone for m in (ms or [])]
    bad = sorted(int(r[1]) for r in table if r[0] != 0)
    extra = f" (stages {bad} all failed the check; this message is the first's)" if len(bad) > 1 else ""
    raise ContractError(messages[0] + extra)


def _gather_rows(rows: list[list[float]], stage: Any) -> list[list[float]]:
    local = torch.tensor(rows, dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size(stage.group) == 1:
        return local.tolist()
    n = dist.get_world_size(stage.group)
    local = local.to(stage.device)
    out = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(out, local, group=stage.group)
    table = torch.cat(out).cpu().tolist()
    return sorted(table, key=lambda r: r[1])


def summary_line(schedule: Any) -> str | None:
    """One line for a log: every stage's result of the last check (None if none ran)."""
    results = getattr(schedule, "chunk_check_results", None)
    if not results:
        return None
    parts = [
        f"stage {r['stage']} {'ok' if r['ok'] else 'FAILED'} (max diff {r['max_diff']:.2g} "
        f"{'<=' if r['ok'] else '>'} tol {r['tol']:.2g}, {r['seconds'] * 1e3:.0f} ms)"
        for r in results
    ]
    return "chunk-exactness check: " + "; ".join(parts)
