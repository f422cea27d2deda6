"""ScheduleSeq1F1B: sequence-level 1F1B on torch.distributed.pipelining.

A drop-in for ``Schedule1F1B``: ``step(x, target=y, losses=losses)`` takes whole
batches, cuts them into ``n_microbatches`` along dim 0 and each micro-batch into
``n_seq_chunks`` along ``seq_dim``, and runs the units in Seq1F1B order (see
:mod:`pipelining_seq.schedule_ir`).

Loss weighting. The loss function is called once per unit, on the chunk's outputs and
targets. With ``loss_reduction="mean"`` (the default when ``scale_grads=True``: a
per-token mean such as ``cross_entropy``) chunk j's loss is weighted by
``len_j / seq_len``, so the k weighted chunk losses sum to the micro-batch's token mean
whatever the chunk lengths, gradients are divided by ``n_microbatches`` at the end, and
``losses`` receives one entry per micro-batch equal to what ``Schedule1F1B`` reports.
With ``loss_reduction="sum"`` (the default when ``scale_grads=False``: a loss that adds
over tokens, such as ``cross_entropy(reduction="sum")`` or torchtitan's
``sum / global_tokens``) chunk losses are used as they are, gradients are not rescaled,
and each micro-batch's reported loss is the sum of its chunks' losses, again what
``Schedule1F1B`` reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.profiler import record_function
from torch.utils._pytree import tree_map

from . import _compat, schedule_ir
from .partition import SeqPartition, resolve_partition
from .stage import SequencePipelineStage

__all__ = ["ScheduleSeq1F1B"]

logger = logging.getLogger(__name__)


@_compat.check_overrides
class ScheduleSeq1F1B(PipelineScheduleSingle):
    """Seq1F1B: 1F1B over (micro-batch, sequence-chunk) units.

    Args:
        stage: a :class:`SequencePipelineStage` (a plain ``PipelineStage`` works only
            with ``n_seq_chunks=1``).
        n_microbatches: micro-batches per step, split along dim 0 as in ``Schedule1F1B``.
        loss_fn: ``loss_fn(output, target)``, called per unit on the last stage.
        n_seq_chunks: chunks per micro-batch along ``seq_dim``.
        seq_partition: ``"uniform"``, a list of chunk lengths summing to the sequence
            length (e.g. from :func:`balanced_partition`), or a callable
            ``seq_len -> lengths``.
        seq_dim: sequence dimension of the inputs and targets given to ``step``.
        scale_grads: divide gradients by ``n_microbatches`` at the end of the step.
        seq_len: the sequence length, for stages that receive no input tensors when
            ``seq_partition`` is not an explicit list. If omitted, the first stage sends
            the chunk lengths down the pipeline at the start of every step.
        loss_reduction: ``"mean"`` or ``"sum"``; how chunk losses combine (module docs).
            Defaults to ``"mean"`` if ``scale_grads`` else ``"sum"``.
        early_recv: post each forward's activation receive one unit ahead, so the
            transfer overlaps the current unit's compute. Seq1F1B has k times as many
            receives as 1F1B, and a receive posted after its data arrived costs a few
            milliseconds on gloo. Default: on for gloo process groups, off otherwise
            (NCCL enqueues receives on its stream in order, where posting early buys
            nothing).
    """

    def __init__(
        self,
        stage: Any,
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        n_seq_chunks: int,
        seq_partition: SeqPartition = "uniform",
        seq_dim: int = 1,
        scale_grads: bool = True,
        seq_len: int | None = None,
        loss_reduction: Literal["mean", "sum"] | None = None,
        early_recv: bool | None = None,
        args_chunk_spec: Any = None,
        kwargs_chunk_spec: Any = None,
        output_merge_spec: Any = None,
    ) -> None:
        for name, val in (("n_microbatches", n_microbatches), ("n_seq_chunks", n_seq_chunks)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"ScheduleSeq1F1B: {name}={val!r} must be a positive integer")
        p = stage.num_stages
        if n_microbatches * n_seq_chunks < p:
            raise ValueError(
                f"ScheduleSeq1F1B: n_microbatches ({n_microbatches}) * n_seq_chunks "
                f"({n_seq_chunks}) = {n_microbatches * n_seq_chunks} units cannot fill "
                f"{p} pipeline stages: raise n_microbatches or n_seq_chunks so that their "
                f"product is at least {p}"
            )
        if n_seq_chunks > 1 and not isinstance(stage, SequencePipelineStage):
            raise TypeError(
                f"ScheduleSeq1F1B(n_seq_chunks={n_seq_chunks}) needs a SequencePipelineStage "
                f"(got {type(stage).__name__}): build the stage with "
                "pipelining_seq.SequencePipelineStage(...), same arguments"
            )
        if loss_reduction not in (None, "mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'")
        if isinstance(seq_partition, str):
            # With seq_len known, check the lengths now; otherwise at least the name.
            resolve_partition(seq_partition, seq_len or n_seq_chunks, n_seq_chunks)
        elif callable(seq_partition):
            if seq_len is not None:
                resolve_partition(seq_partition, seq_len, n_seq_chunks)
        else:
            resolve_partition(seq_partition, sum(seq_partition), n_seq_chunks)
            if seq_len is not None and seq_len != sum(seq_partition):
                raise ValueError(
                    f"seq_len={seq_len} but seq_partition {list(seq_partition)} sums to "
                    f"{sum(seq_partition)}: drop seq_len or make them agree"
                )
            seq_len = sum(seq_partition)
        self._n_real_microbatches = n_microbatches
        self._n_seq_chunks = n_seq_chunks
        self._seq_partition = seq_partition
        self._seq_dim = seq_dim
        self._seq_len = seq_len
        self._loss_reduction = loss_reduction or ("mean" if scale_grads else "sum")
        self._early_recv = early_recv
        self._fwd_recv_work: dict[int, list] = {}
        self._lengths: list[int] = []
        super().__init__(
            stage,
            n_microbatches * n_seq_chunks,  # the base class counts units
            loss_fn,
            args_chunk_spec=args_chunk_spec,
            kwargs_chunk_spec=kwargs_chunk_spec,
            output_merge_spec=output_merge_spec,
            scale_grads=scale_grads,
        )

    @property
    def n_microbatches(self) -> int:
        return self._n_real_microbatches

    @property
    def n_seq_chunks(self) -> int:
        return self._n_seq_chunks

    @property
    def chunk_lengths(self) -> list[int]:
        """Chunk lengths of the last step (empty before the first step)."""
        return list(self._lengths)

    def _get_pipeline_order(self) -> dict[int, list]:
        """torch's ``_Action`` IR of every rank, unit ids ``u = microbatch * k + chunk``."""
        return schedule_ir.pipeline_order(self._num_stages, self._n_real_microbatches, self._n_seq_chunks)

    # ------------------------------------------------------------------ splitting
    def _split_batch(self, tensors: list, what: str) -> None:
        m = self._n_real_microbatches
        for t in tensors:
            if t.shape[0] % m:
                raise ValueError(
                    f"ScheduleSeq1F1B: {what} batch size {t.shape[0]} is not divisible by "
                    f"n_microbatches={m}: change the batch size or n_microbatches"
                )

    def _local_seq_len(self, args, kwargs, target) -> int | None:
        found: list[tuple[str, int]] = []
        for name, t in [("input", a) for a in args] + [(k, v) for k, v in kwargs.items()]:
            if isinstance(t, torch.Tensor) and t.dim() > self._seq_dim:
                found.append((name, t.shape[self._seq_dim]))
        if isinstance(target, torch.Tensor) and target.dim() > self._seq_dim:
            found.append(("target", target.shape[self._seq_dim]))
        if not found:
            return None
        if len({s for _, s in found}) > 1:
            raise ValueError(
                f"ScheduleSeq1F1B: tensors disagree on the sequence length along "
                f"seq_dim={self._seq_dim}: {found}"
            )
        return found[0][1]

    def _exchange_lengths(self, local: list[int] | None) -> list[int]:
        """First stage sends the chunk lengths down the pipeline (when not static)."""
        stage = self._stage
        k = self._n_seq_chunks
        buf = torch.zeros(k, dtype=torch.int64, device=stage.device)
        if not stage.is_first:
            dist.recv(buf, src=_compat.peer_global_rank(stage, stage.stage_index - 1), group=stage.group)
            received = buf.tolist()
            if local is not None and local != received:
                raise ValueError(
                    f"stage {stage.stage_index}: local chunk lengths {local} differ from the "
                    f"first stage's {received}: inputs and targets must share one sequence length"
                )
            local = received
        elif local is None:
            raise ValueError(
                "ScheduleSeq1F1B: the first stage got no input tensor to read the sequence "
                "length from: pass the inputs to step() on the first stage"
            )
        if not stage.is_last:
            buf.copy_(torch.tensor(local, dtype=torch.int64))
            dist.send(buf, dst=_compat.peer_global_rank(stage, stage.stage_index + 1), group=stage.group)
        return local

    def _chunk_lengths(self, seq_len: int | None) -> list[int]:
        static = self._seq_len
        if static is not None and seq_len is not None and seq_len != static:
            raise ValueError(
                f"ScheduleSeq1F1B: inputs have sequence length {seq_len} but the schedule was "
                f"built for {static}: pass inputs of that length, or change seq_partition / seq_len"
            )
        local = resolve_partition(self._seq_partition, seq_len or static, self._n_seq_chunks) if (
            seq_len or static
        ) else None
        if static is not None or self._stage.num_stages == 1:
            return local
        return self._exchange_lengths(local)

    def _split_seq(self, value: Any, seq_len: int) -> list[Any]:
        k = self._n_seq_chunks
        if isinstance(value, torch.Tensor) and value.dim() > self._seq_dim and value.shape[self._seq_dim] == seq_len:
            return [c.contiguous() for c in torch.split(value, self._lengths, dim=self._seq_dim)]
        return [value] * k

    def _units(self, mbs: list, seq_len: int | None) -> list:
        """Micro-batch args/kwargs/targets → unit args/kwargs/targets."""
        out = []
        for mb in mbs:
            if isinstance(mb, tuple):
                cols = [self._split_seq(a, seq_len) for a in mb]
                out += [tuple(c[j] for c in cols) for j in range(self._n_seq_chunks)]
            elif isinstance(mb, dict):
                cols = {key: self._split_seq(a, seq_len) for key, a in mb.items()}
                out += [{key: c[j] for key, c in cols.items()} for j in range(self._n_seq_chunks)]
            else:
                out += self._split_seq(mb, seq_len)
        return out

    def _prepare_units(self, arg_mbs, kwarg_mbs, target_mbs, seq_len):
        self._lengths = self._chunk_lengths(seq_len)
        seq_len = sum(self._lengths)
        if isinstance(self._stage, SequencePipelineStage):
            self._stage.configure_seq_chunks(
                n_microbatches=self._n_real_microbatches, chunk_lengths=self._lengths
            )
        return (
            self._units(arg_mbs, seq_len),
            self._units(kwarg_mbs, seq_len),
            self._units(target_mbs, seq_len) if target_mbs is not None else None,
        )

    # ------------------------------------------------------------------------ step
    def step(
        self,
        *args: Any,
        target: Any = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One training step on a whole batch, like ``Schedule1F1B.step``.

        Also accepts torchtitan's pre-split form ``step(arg_mbs=..., kwarg_mbs=...,
        target_mbs=..., losses=...)`` with one entry per micro-batch.
        """
        if self._has_backward and not torch.is_grad_enabled():
            raise RuntimeError(
                "step() requires gradients to be enabled; call eval() for forward-only runs"
            )
        m = self._n_real_microbatches
        pre_split = {key: kwargs.pop(key) for key in ("arg_mbs", "kwarg_mbs", "target_mbs") if key in kwargs}
        if pre_split:
            if args or kwargs or target is not None:
                raise ValueError("step(): pass either whole-batch inputs or arg_mbs/kwarg_mbs/target_mbs, not both")
            arg_mbs = pre_split.get("arg_mbs") or [()] * m
            kwarg_mbs = pre_split.get("kwarg_mbs") or [{}] * m
            target_mbs = pre_split.get("target_mbs")
            for name, mbs in (("arg_mbs", arg_mbs), ("kwarg_mbs", kwarg_mbs), ("target_mbs", target_mbs)):
                if mbs is not None and len(mbs) != m:
                    raise ValueError(f"step(): {name} has {len(mbs)} entries, expected n_microbatches={m}")
            seq_len = self._local_seq_len(arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs else None)
        else:
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            self._split_batch(tensors, "input")
            if isinstance(target, torch.Tensor):
                self._split_batch([target], "target")
            seq_len = self._local_seq_len(args, kwargs, target)
            if args or kwargs:
                arg_mbs, kwarg_mbs = split_args_kwargs_into_chunks(
                    args, kwargs, m, self._args_chunk_spec, self._kwargs_chunk_spec
                )
            else:
                arg_mbs, kwarg_mbs = [()] * m, [{}] * m
            target_mbs = list(torch.tensor_split(target, m)) if target is not None else None

        self._stage.has_backward = self._has_backward
        self._stage.clear_runtime_states()
        arg_units, kwarg_units, target_units = self._prepare_units(arg_mbs, kwarg_mbs, target_mbs, seq_len)
        self._step_microbatches(arg_units, kwarg_units, target_units, losses, return_outputs, loss_kwargs)
        if self._stage.is_last and return_outputs:
            return self._merge_outputs(self._merge_chunks(self._stage.output_chunks))
        return None

    def _merge_chunks(self, unit_outputs: list) -> list:
        k, d = self._n_seq_chunks, self._seq_dim
        merged = []
        for n in range(len(unit_outputs) // k):
            group = unit_outputs[n * k:(n + 1) * k]
            if isinstance(group[0], torch.Tensor):
                merged.append(torch.cat(group, dim=d))
            elif isinstance(group[0], (tuple, list)):
                merged.append(type(group[0])(torch.cat(parts, dim=d) for parts in zip(*group)))
            else:
                merged.append(tree_map(lambda x: x, group[0]))
        return merged

    # ------------------------------------------------------------------------ losses
    def _maybe_compute_loss(self, stage, output, target_mbs, mb_index, loss_kwargs=None):
        if stage.is_last and self._loss_fn is not None:
            loss = self._loss_fn(output, target_mbs[mb_index], **(loss_kwargs or {}))
            if self._loss_reduction == "mean" and self._n_seq_chunks > 1:
                loss = loss * (self._lengths[mb_index % self._n_seq_chunks] / sum(self._lengths))
            self._internal_losses.append(loss)

    def _update_losses(self, stages, losses):
        k = self._n_seq_chunks
        unit_losses = self._internal_losses
        if self._stage.is_last and losses is not None:
            if len(unit_losses) != self._n_microbatches:
                raise RuntimeError(f"expected {self._n_microbatches} unit losses, got {len(unit_losses)}")
            losses.clear()
            losses.extend(
                unit_losses[n] if k == 1 else torch.stack(unit_losses[n * k:(n + 1) * k]).detach().sum()
                for n in range(self._n_real_microbatches)
            )
        self._internal_losses.clear()

    # ------------------------------------------------------------------- execution
    def _step_microbatches(
        self,
        arg_mbs: list | None = None,
        kwarg_mbs: list | None = None,
        target_mbs: list | None = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Run the units of one step; ``arg_mbs`` etc. hold one entry per unit."""
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        _compat.initialize_stage(
            self, arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs is not None else None, loss_kwargs
        )
        if self._has_backward:
            self._run_1f1b(arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
        else:
            with torch.no_grad():
                self._run_forward_only(arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
        self._update_losses(self._stage, losses)
        if self._has_backward:
            self._stage.perform_reduce_grad(self._n_real_microbatches if self.scale_grads else 1)

    def _forward(self, u, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs):
        stage = self._stage
        with record_function(f"PP:{stage.stage_index}F{u}"):
            output = stage.forward_one_chunk(u, arg_mbs[u], kwarg_mbs[u], save_forward_output=return_outputs)
        self._maybe_compute_loss(stage, output, target_mbs, u, loss_kwargs)

    def _backward(self, u, last_backward):
        stage = self._stage
        with record_function(f"PP:{stage.stage_index}B{u}"):
            stage.backward_one_chunk(u, loss=self._maybe_get_loss(stage, u), last_backward=last_backward)

    def _run_forward_only(self, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs):
        stage = self._stage
        sends: list = []
        for u in range(self._n_microbatches):
            _compat.wait_batch_p2p(_compat.batch_p2p(stage.get_fwd_recv_ops(u), desc="fwd_recv"))
            self._forward(u, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
            sends.append(_compat.batch_p2p(stage.get_fwd_send_ops(u), desc="fwd_send"))
        for work in sends:
            _compat.wait_batch_p2p(work)

    def _use_early_recv(self) -> bool:
        if self._early_recv is not None:
            return self._early_recv
        group = self._stage.group or _compat.default_group()
        return dist.get_backend(group) == "gloo"

    def _post_fwd_recv(self, u: int) -> None:
        if u < self._n_microbatches and u not in self._fwd_recv_work:
            self._fwd_recv_work[u] = _compat.batch_p2p(self._stage.get_fwd_recv_ops(u), desc="fwd_recv")

    def _wait_fwd_recv(self, u: int) -> None:
        self._post_fwd_recv(u)
        _compat.wait_batch_p2p(self._fwd_recv_work.pop(u))

    def _run_1f1b(self, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs):
        # Same structure as Schedule1F1B._step_microbatches (fused send/recv pairs), with
        # the Seq1F1B warm-up and backward order. Counted as torch counts: warm-up
        # includes the forward that the steady state's first backward follows.
        stage = self._stage
        n = self._n_microbatches
        early = self._use_early_recv()
        self._fwd_recv_work.clear()
        bwd_order = schedule_ir.backward_unit_order(self._n_real_microbatches, self._n_seq_chunks)
        warmup = min(
            n,
            schedule_ir.warmup_units(stage.num_stages, stage.stage_index, self._n_real_microbatches, self._n_seq_chunks) + 1,
        )
        fwd = bwd = 0
        send_work: list = []
        fwd_sends: list = []
        for _ in range(warmup):
            self._wait_fwd_recv(fwd)
            if early:
                self._post_fwd_recv(fwd + 1)
            self._forward(fwd, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
            _compat.wait_batch_p2p(send_work)
            fwd_sends = stage.get_fwd_send_ops(fwd)
            if fwd != warmup - 1:
                send_work = _compat.batch_p2p(fwd_sends, desc="fwd_send")
            fwd += 1

        while True:
            u = bwd_order[bwd]
            works = _compat.batch_p2p(fwd_sends + stage.get_bwd_recv_ops(u), desc="fwd_send_bwd_recv")
            if early:
                self._post_fwd_recv(fwd)
            _compat.wait_batch_p2p(works)
            self._backward(u, last_backward=bwd == n - 1)
            bwd_sends = stage.get_bwd_send_ops(u)
            bwd += 1
            if fwd == n:
                break
            if early:
                _compat.wait_batch_p2p(_compat.batch_p2p(bwd_sends, desc="bwd_send"))
                self._wait_fwd_recv(fwd)
            else:
                fwd_recvs = stage.get_fwd_recv_ops(fwd)
                _compat.wait_batch_p2p(_compat.batch_p2p(bwd_sends + fwd_recvs, desc="bwd_send_fwd_recv"))
            self._forward(fwd, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
            fwd_sends = stage.get_fwd_send_ops(fwd)
            fwd += 1

        send_work = _compat.batch_p2p(bwd_sends, desc="bwd_send")
        while bwd < n:
            u = bwd_order[bwd]
            _compat.wait_batch_p2p(_compat.batch_p2p(stage.get_bwd_recv_ops(u), desc="bwd_recv"))
            self._backward(u, last_backward=bwd == n - 1)
            _compat.wait_batch_p2p(send_work)
            send_work = _compat.batch_p2p(stage.get_bwd_send_ops(u), desc="bwd_send")
            bwd += 1
        _compat.wait_batch_p2p(send_work)
