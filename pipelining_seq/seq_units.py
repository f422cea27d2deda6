"""Whole batches to (micro-batch, chunk) units and back: the part every Seq1F1B schedule shares.

``SeqUnits`` holds a schedule's chunking settings and does, per step:

* split whole-batch inputs and targets into micro-batches (dim 0), or take torchtitan's
  pre-split ``arg_mbs``/``kwarg_mbs``/``target_mbs``;
* resolve the chunk lengths (from ``seq_partition`` and the local sequence length, or
  received from the previous rank when this rank has no input to read it from);
* cut every micro-batch into chunks along ``seq_dim`` (unit id ``u = n*k + j``);
* weight each unit's loss (:meth:`SeqUnits.weight_loss`, the single place the loss
  weighting lives) and sum the chunk losses of a micro-batch for ``losses``;
* merge the last stage's unit outputs back into micro-batch outputs.

Loss weighting. With ``loss_reduction="mean"`` (the default when ``scale_grads=True``:
a per-token mean such as ``cross_entropy``) chunk j's loss is weighted by
``len_j / seq_len``, so the k weighted chunk losses sum to the micro-batch's token mean
whatever the chunk lengths; the schedule divides gradients by the number of
micro-batches. With ``loss_reduction="sum"`` chunk losses are used as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

from . import agreement, p2p, stage_check
from .attention import check_document_ids
from .chunking import ChunkingConfig
from .losses import chunk_loss_weights, weight_chunk_loss
from .stage import SequencePipelineStage

__all__ = ["SeqChunkedSchedule", "SeqUnits", "check_positive"]

logger = logging.getLogger(__name__)


def check_positive(owner: str, **values: Any) -> None:
    """Raise ValueError unless every value is a positive integer."""
    for name, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{owner}: {name}={val!r} must be a positive integer")


class SeqUnits:
    """Chunking settings of a Seq1F1B schedule and the per-step unit plumbing.

    Args:
        owner: the schedule's name, for error messages.
        n_microbatches: micro-batches per step.
        chunking: the schedule's :class:`~pipelining_seq.chunking.ChunkingConfig`.
        scale_grads: the schedule's; picks the default ``loss_reduction``.
    """

    def __init__(
        self, *, owner: str, n_microbatches: int, chunking: ChunkingConfig, scale_grads: bool = True
    ) -> None:
        check_positive(owner, n_microbatches=n_microbatches)
        self.owner = owner
        self.n_microbatches = n_microbatches
        self.chunking = chunking
        self.n_seq_chunks = chunking.n_seq_chunks
        self.seq_partition = chunking.seq_partition
        self.seq_dim = chunking.seq_dim
        self.seq_len = chunking.static_seq_len
        self.loss_reduction: str = chunking.loss_reduction or ("mean" if scale_grads else "sum")
        self.ignore_index = chunking.ignore_index
        self.lengths: list[int] = []
        self.unit_weights: list[float] | None = None

    # ------------------------------------------------------------------ splitting
    def split_step(
        self, args: tuple, kwargs: dict, target: Any, args_chunk_spec: Any, kwargs_chunk_spec: Any
    ) -> tuple[list, list, list | None, int | None]:
        """Micro-batch args, kwargs, targets and the local sequence length of a ``step`` call.

        ``kwargs`` may hold torchtitan's pre-split ``arg_mbs``/``kwarg_mbs``/``target_mbs``
        (popped from it).
        """
        m = self.n_microbatches
        # torch >= 2.14's eval() forwards arg_mbs=None, kwarg_mbs=None, target_mbs=None to
        # step() even for whole-batch calls, and torchtitan passes arg_mbs=None on stages
        # without the first layer: an unset entry is absence.
        pre_split = {key: kwargs.pop(key) for key in ("arg_mbs", "kwarg_mbs", "target_mbs") if key in kwargs}
        pre_split = {key: value for key, value in pre_split.items() if value is not None}
        if pre_split:
            if args or kwargs or target is not None:
                raise ValueError("step(): pass either whole-batch inputs or arg_mbs/kwarg_mbs/target_mbs, not both")
            arg_mbs = pre_split.get("arg_mbs") or [()] * m
            kwarg_mbs = pre_split.get("kwarg_mbs") or [{}] * m
            target_mbs = pre_split.get("target_mbs")
            for name, mbs in (("arg_mbs", arg_mbs), ("kwarg_mbs", kwarg_mbs), ("target_mbs", target_mbs)):
                if mbs is not None and len(mbs) != m:
                    raise ValueError(f"step(): {name} has {len(mbs)} entries, expected n_microbatches={m}")
            self._check_same_batch([t for t in (*arg_mbs[0], *kwarg_mbs[0].values()) if isinstance(t, torch.Tensor)],
                                   "micro-batch input")
            if target_mbs is not None and isinstance(target_mbs[0], torch.Tensor):
                self._check_same_batch([target_mbs[0]], "micro-batch target")
            seq_len = self.local_seq_len(arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs else None)
            return list(arg_mbs), list(kwarg_mbs), target_mbs, seq_len
        if "document_ids" in kwargs:  # checked here, before any communication
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            check_document_ids(kwargs["document_ids"], batch=None if first is None else first.shape[0],
                               what="step(document_ids=...)")
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        self._check_batch(tensors, "input")
        if isinstance(target, torch.Tensor):
            self._check_batch([target], "target")
        seq_len = self.local_seq_len(args, kwargs, target)
        if args or kwargs:
            arg_mbs, kwarg_mbs = split_args_kwargs_into_chunks(args, kwargs, m, args_chunk_spec, kwargs_chunk_spec)
        else:
            arg_mbs, kwarg_mbs = [()] * m, [{}] * m
        target_mbs = list(torch.tensor_split(target, m)) if target is not None else None
        return arg_mbs, kwarg_mbs, target_mbs, seq_len

    def _check_batch(self, tensors: list, what: str) -> None:
        m = self.n_microbatches
        for t in tensors:
            if t.shape[0] % m:
                raise ValueError(
                    f"{self.owner}: {what} batch size {t.shape[0]} is not divisible by "
                    f"n_microbatches={m}: change the batch size or n_microbatches"
                )
        self._check_same_batch(tensors, what)

    def _check_same_batch(self, tensors: list, what: str) -> None:
        """The batch size of every call equals the first call's (on this rank, before any
        communication): the stages' receive buffers are shaped by the first call, so another
        size would fail inside torch, or, smaller, return rows of an earlier batch."""
        first = self.__dict__.setdefault("_first_batch", {})
        for t in tensors:
            if t.dim() == 0:
                continue
            size = first.setdefault(what, int(t.shape[0]))
            if int(t.shape[0]) != size:
                raise ValueError(
                    f"{self.owner}: {what} batch size {t.shape[0]} differs from {size} of the first step/eval "
                    "call: a schedule's stages keep the first call's shapes; keep the batch size, or build new "
                    "stages and a new schedule for this one"
                )

    def check_targets(self, *, is_last: bool, loss_fn: Any, has_backward: bool, target_mbs: Any, losses: Any) -> bool:
        """Whether the last stage computes losses this call; refuses a training step, or an
        eval asking for ``losses``, without targets (before any communication)."""
        if not is_last or loss_fn is None:
            return False
        if target_mbs is not None:
            return True
        call = "step" if has_backward else "eval"
        if has_backward or losses is not None:
            raise ValueError(
                f"{self.owner}.{call}(): the rank holding the last stage got no target= but the schedule has a "
                f"loss_fn{' and losses= was given' if not has_backward else ''}: pass the batch's targets there"
                + ("" if has_backward else ", or call eval() without losses= for the outputs only")
            )
        return False  # eval without targets: outputs only, no loss

    def local_seq_len(self, args: Any, kwargs: dict, target: Any) -> int | None:
        """The sequence length this rank's inputs/targets agree on, or None if it has none."""
        found: list[tuple[str, int]] = []
        for name, t in [("input", a) for a in args] + [(k, v) for k, v in kwargs.items()]:
            if isinstance(t, torch.Tensor) and t.dim() > self.seq_dim:
                found.append((name, t.shape[self.seq_dim]))
        if isinstance(target, torch.Tensor) and target.dim() > self.seq_dim:
            found.append(("target", target.shape[self.seq_dim]))
        if not found:
            return None
        if len({s for _, s in found}) > 1:
            raise ValueError(
                f"{self.owner}: tensors disagree on the sequence length along "
                f"seq_dim={self.seq_dim}: {found}"
            )
        return found[0][1]

    # ------------------------------------------------------------- chunk lengths
    def resolve_lengths(
        self, seq_len: int | None, *, exchange: Callable[[list[int] | None], list[int]] | None
    ) -> list[int]:
        """This step's chunk lengths; ``exchange`` (None on a one-rank pipeline) relays them
        from the first rank when they are not static."""
        static = self.seq_len
        if static is not None and seq_len is not None and seq_len != static:
            raise ValueError(
                f"{self.owner}: inputs have sequence length {seq_len} but the schedule was "
                f"built for {static}: pass inputs of that length, or change seq_partition / seq_len"
            )
        total = seq_len or static
        local = self.chunking.lengths(total) if total else None
        if static is None and exchange is not None:
            local = exchange(local)
        if local is None:
            raise ValueError(
                f"{self.owner}: no input tensor to read the sequence length from: pass the "
                "inputs to step() on the first stage"
            )
        self.lengths = list(local)
        return self.lengths

    def exchange_lengths(
        self, local: list[int] | None, *, device: Any, group: Any, prev_rank: int | None, next_rank: int | None,
        where: str,
    ) -> list[int]:
        """Receive the chunk lengths from ``prev_rank`` (global rank; None on the first
        rank) and pass them on to ``next_rank`` (None on the last)."""
        buf = torch.zeros(self.n_seq_chunks, dtype=torch.int64, device=device)
        if prev_rank is not None:  # through p2p: a bounded wait whose failure names stage and peer
            p2p.wait(p2p.post([dist.P2POp(dist.irecv, buf, prev_rank, group)], desc="chunk lengths recv"))
            received = buf.tolist()
            if local is not None and local != received:
                raise ValueError(
                    f"{where}: local chunk lengths {local} differ from the first stage's "
                    f"{received}: inputs and targets must share one sequence length"
                )
            local = received
        elif local is None:
            raise ValueError(
                f"{self.owner}: the first stage got no input tensor to read the sequence "
                "length from: pass the inputs to step() on the first stage"
            )
        if next_rank is not None:
            buf.copy_(torch.tensor(local, dtype=torch.int64))
            p2p.wait(p2p.post([dist.P2POp(dist.isend, buf, next_rank, group)], desc="chunk lengths send"))
        return local

    def _split_seq(self, value: Any, seq_len: int) -> list[Any]:
        d = self.seq_dim
        if isinstance(value, torch.Tensor) and value.dim() > d and value.shape[d] == seq_len:
            return [c.contiguous() for c in torch.split(value, self.lengths, dim=d)]
        return [value] * self.n_seq_chunks

    def units(self, mbs: list) -> list:
        """Micro-batch args/kwargs/targets → unit args/kwargs/targets (``u = n*k + j``)."""
        seq_len = sum(self.lengths)
        k = self.n_seq_chunks
        out: list = []
        for mb in mbs:
            if isinstance(mb, tuple):
                cols = [self._split_seq(a, seq_len) for a in mb]
                out += [tuple(c[j] for c in cols) for j in range(k)]
            elif isinstance(mb, dict):
                cols_d = {key: self._split_seq(a, seq_len) for key, a in mb.items()}
                out += [{key: c[j] for key, c in cols_d.items()} for j in range(k)]
            else:
                out += self._split_seq(mb, seq_len)
        return out

    def merge_chunks(self, unit_outputs: list) -> list:
        """Unit outputs of the last stage → one output per micro-batch (cat along seq_dim)."""
        k, d = self.n_seq_chunks, self.seq_dim
        merged = []
        for n in range(len(unit_outputs) // k):
            group = unit_outputs[n * k:(n + 1) * k]
            if isinstance(group[0], torch.Tensor):
                merged.append(torch.cat(group, dim=d))
            elif isinstance(group[0], (tuple, list)):
                merged.append(type(group[0])(torch.cat(parts, dim=d) for parts in zip(*group)))
            else:
                raise TypeError(
                    f"the last stage returned a {type(group[0]).__name__}; chunk outputs are merged along "
                    f"seq_dim={d} only for a tensor or a tuple/list of tensors: return one of those, or call "
                    "step(..., return_outputs=False)"
                )
        return merged

    # ------------------------------------------------------------------- losses
    def set_targets(self, target_units: list | None) -> None:
        """Compute this step's loss weights from the unit targets (last stage): in "mean"
        mode, chunk j's share of the micro-batch's counted targets (:mod:`pipelining_seq.losses`)."""
        self.unit_weights = None
        if target_units is not None and self.loss_reduction == "mean" and self.n_seq_chunks > 1:
            self.unit_weights = chunk_loss_weights(
                target_units, n_chunks=self.n_seq_chunks, lengths=self.lengths, ignore_index=self.ignore_index,
            )

    def weight_loss(self, loss: torch.Tensor, unit: int, output: Any = None) -> torch.Tensor:
        """The loss of ``unit`` as it enters backward and the micro-batch sum."""
        if self.loss_reduction != "mean" or self.n_seq_chunks == 1:
            return loss
        if self.unit_weights is not None:
            weight = self.unit_weights[unit]
        else:  # no targets seen this step (a loss_fn without targets): the length share
            weight = self.lengths[unit % self.n_seq_chunks] / sum(self.lengths)
        return weight_chunk_loss(loss, output, weight)

    def microbatch_losses(self, unit_losses: list) -> list:
        """One loss per micro-batch: the sum of its weighted chunk losses."""
        k = self.n_seq_chunks
        if len(unit_losses) != self.n_microbatches * k:
            raise RuntimeError(f"expected {self.n_microbatches * k} unit losses, got {len(unit_losses)}")
        return [
            unit_losses[n] if k == 1 else torch.stack(unit_losses[n * k:(n + 1) * k]).detach().sum()
            for n in range(self.n_microbatches)
        ]


def _setting(name: str, doc: str) -> property:
    """A read-only property forwarding to the schedule's :class:`SeqUnits`."""
    return property(lambda self: getattr(self._units, name), doc=doc)


class SeqChunkedSchedule:
    """What the three Seq1F1B schedules share (a mixin before torch's schedule base class):
    the chunking settings (``self._units``, a :class:`SeqUnits`), the step path from whole
    batches to units, the chunk-length exchange, and the per-unit loss hooks.

    A schedule provides :meth:`_seq_stages` (the stages this rank drives) and
    :meth:`_length_peers` (global ranks of the previous / next pipeline rank).
    """

    _units: SeqUnits
    _n_microbatches: int  # set by torch's schedule base class: the unit count

    # ------------------------------------------------------------- construction
    def _init_units(
        self, owner: str, n_microbatches: int, chunking: ChunkingConfig | None, scale_grads: bool, **keywords: Any
    ) -> SeqUnits:
        """Chunking from ``chunking=`` or the keywords (:func:`~pipelining_seq.chunking.chunking_from`)."""
        from .chunking import chunking_from

        check_positive(owner, n_microbatches=n_microbatches)
        config = chunking_from(owner, chunking, **keywords)
        self._units = SeqUnits(owner=owner, n_microbatches=n_microbatches, chunking=config, scale_grads=scale_grads)
        return self._units

    def _seq_stages(self) -> list:
        raise NotImplementedError

    def _length_peers(self) -> tuple[int | None, int | None, str]:
        """Global ranks of the previous and next pipeline rank (None at the ends), and this rank's name."""
        raise NotImplementedError

    # ------------------------------------------------------------------ step path
    def _prepare_step(self, args: tuple, kwargs: dict, target: Any, losses: list | None = None) -> tuple[list, list, list | None]:
        """Whole-batch ``step`` inputs → unit args, kwargs and targets: split into
        micro-batches, agree on the settings, resolve the chunk lengths, configure the
        stages, cut into units, weight the losses. Every check on the inputs runs before
        any communication."""
        if self._has_backward and not torch.is_grad_enabled():
            raise RuntimeError("step() requires gradients to be enabled; call eval() for forward-only runs")
        units, stages = self._units, self._seq_stages()
        arg_mbs, kwarg_mbs, target_mbs, seq_len = units.split_step(
            args, kwargs, target, self._args_chunk_spec, self._kwargs_chunk_spec
        )
        units.check_targets(is_last=any(stage.is_last for stage in stages), loss_fn=self._loss_fn,
                            has_backward=self._has_backward, target_mbs=target_mbs, losses=losses)
        p2p.note(stage=stages[0].stage_index, n_seq_chunks=units.n_seq_chunks)  # for timeout messages
        agreement.check_schedule(self, stage=stages[0], units=units,  # once per kind: one small collective
                                 keyword_inputs=kwarg_mbs[0] if kwarg_mbs else {})
        for stage in stages:
            stage.has_backward = self._has_backward
            stage.clear_runtime_states()
        prev_rank, next_rank, _ = self._length_peers()
        exchange = None if prev_rank is None and next_rank is None else self._exchange_lengths
        lengths = units.resolve_lengths(seq_len, exchange=exchange)
        for stage in stages:
            if isinstance(stage, SequencePipelineStage):
                stage.configure_seq_chunks(n_microbatches=units.n_microbatches, chunk_lengths=lengths)
        target_units = units.units(target_mbs) if target_mbs is not None else None
        has_last = any(stage.is_last for stage in stages)
        units.set_targets(target_units if has_last and self._loss_fn is not None else None)
        return units.units(arg_mbs), units.units(kwarg_mbs), target_units

    def step(
        self,
        *args: Any,
        target: Any = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One training step on a whole batch, like torch's ``Schedule1F1B.step`` /
        ``ScheduleInterleaved1F1B.step``; ``losses`` receives one loss per micro-batch.

        Also accepts torchtitan's pre-split form ``step(arg_mbs=..., kwarg_mbs=...,
        target_mbs=..., losses=...)`` with one entry per micro-batch.
        """
        arg_units, kwarg_units, target_units = self._prepare_step(args, kwargs, target, losses)
        self._run_units(arg_units, kwarg_units, target_units, losses, return_outputs, loss_kwargs)
        stage_check.verify(self, self._seq_stages())  # first step and first eval only
        return self._merged_outputs(return_outputs)

    def _run_units(self, arg_units: list, kwarg_units: list, target_units: list | None, losses: list | None,
                   return_outputs: bool, loss_kwargs: dict[str, Any] | None) -> None:
        """Run one step's units (one entry per unit in each list): the schedule's own execution."""
        raise NotImplementedError

    def _exchange_lengths(self, local: list[int] | None) -> list[int]:
        """The first rank sends the chunk lengths down the pipeline (when not static)."""
        stage = self._seq_stages()[0]
        prev_rank, next_rank, where = self._length_peers()
        return self._units.exchange_lengths(
            local, device=stage.device, group=stage.group, prev_rank=prev_rank, next_rank=next_rank, where=where
        )

    def _merged_outputs(self, return_outputs: bool) -> Any:
        """The last stage's outputs of this step, one per micro-batch merged by torch's spec."""
        for stage in self._seq_stages():
            if stage.is_last and return_outputs:
                return self._merge_outputs(self._units.merge_chunks(stage.output_chunks))
        return None

    # ---------------------------------------------------------------------- losses
    def _maybe_compute_loss(self, stage, output, target_mbs, mb_index, loss_kwargs=None):
        if stage.is_last and self._loss_fn is not None and target_mbs is not None:  # eval without targets: no loss
            loss = self._loss_fn(output, target_mbs[mb_index], **(loss_kwargs or {}))
            self._internal_losses.append(self._units.weight_loss(loss, mb_index, output))

    def _update_losses(self, stages, losses):
        stages = stages if isinstance(stages, list) else [stages]
        if any(s.is_last for s in stages) and losses is not None:
            mb_losses = self._units.microbatch_losses(self._internal_losses)
            losses.clear()
            losses.extend(mb_losses)
        self._internal_losses.clear()

    # --------------------------------------------------------------- settings
    n_microbatches = _setting("n_microbatches", "Micro-batches per step (m), as given to the constructor.")
    n_seq_chunks = _setting("n_seq_chunks", "Chunks per micro-batch (k).")
    seq_partition = _setting(
        "seq_partition", "How sequences are cut: a name ('uniform', 'balanced', 'calibrated'), a list of lengths, "
        "or a callable ``seq_len -> lengths``."
    )
    loss_reduction = _setting("loss_reduction", "How chunk losses combine: 'mean' (weighted by share) or 'sum' (as they are).")
    chunking = _setting("chunking", "The chunking settings (:class:`~pipelining_seq.chunking.ChunkingConfig`).")

    @property
    def n_units(self) -> int:
        """(micro-batch, chunk) units per step, m·k: what torch's base class counts as micro-batches."""
        return self._n_microbatches

    @property
    def chunk_lengths(self) -> list[int]:
        """Chunk lengths of the last step (empty before the first step)."""
        return list(self._units.lengths)
