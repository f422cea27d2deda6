"""The per-step decision every rank takes together: apply the update, skip it, or stop.

After the backward pass and the gradient norm, and before the optimizer step, one
``all_reduce`` over the world carries (a) the step's loss from the one rank that reports
it, and (b) how many ranks were asked to stop by SIGINT/SIGTERM. Every rank then knows the
same loss and grad norm (the norm is already reduced over the pipeline), so they all
stop at the same step, or skip the same update, without a second collective.

A NaN/inf loss or gradient norm stops the run with :class:`NonFiniteError`, naming the
step and the values, before the optimizer touches the weights, so the weights (and every
checkpoint) stay finite; ``training.skip_nonfinite_steps: N`` skips up to N such steps
instead (gradients dropped, no update; the learning-rate schedule still advances).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["NonFiniteError", "StepGuard", "Verdict"]

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or gradient norm of a step is NaN or infinite."""


@dataclass(frozen=True)
class Verdict:
    """What every rank does after this step's backward."""

    update: bool
    """Step the optimizer (False: a skipped non-finite step)."""
    stop: bool
    """Stop after this step (a signal reached some rank)."""
    loss: float
    """The step's loss, known on every rank."""


class StepGuard:
    """Args: ``skip_budget`` (training.skip_nonfinite_steps), ``reporting`` (this rank
    holds the step's loss), ``device`` (where the collective's tensor lives)."""

    def __init__(self, *, skip_budget: int, reporting: bool, device: torch.device, group=None) -> None:
        self.skip_budget = skip_budget
        self.skipped: list[int] = []
        self.reporting = reporting
        self.device = device
        self.group = group

    def check(self, *, step: int, loss: torch.Tensor | None, grad_norm: torch.Tensor, stop_requested: bool) -> Verdict:
        """Collective over the world: every rank calls it once per step."""
        vec = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.reporting and loss is not None:
            vec[0] = loss.detach().to(torch.float64)
        vec[1] = 1.0 if stop_requested else 0.0
        if dist.is_initialized():
            dist.all_reduce(vec, group=self.group)
        value, stops = float(vec[0]), int(vec[1])
        norm = float(grad_norm)
        if math.isfinite(value) and math.isfinite(norm):
            return Verdict(update=True, stop=stops > 0, loss=value)
        what = f"step {step}: loss {value}, gradient norm {norm}"
        if len(self.skipped) < self.skip_budget:
            self.skipped.append(step)
            logger.warning(
                "%s: not finite; skipping this update (%d of training.skip_nonfinite_steps=%d used)",
                what, len(self.skipped), self.skip_budget,
            )
            return Verdict(update=False, stop=stops > 0, loss=value)
        budget = (
            f"; {len(self.skipped)} earlier non-finite step(s) {self.skipped} were skipped" if self.skipped else ""
        )
        raise NonFiniteError(
            f"{what} is not finite: stopping before the optimizer step, so the weights and every checkpoint stay "
            f"finite{budget}. Lower optimizer.lr, set training.max_norm (clipping), resume from the last checkpoint, "
            "or set training.skip_nonfinite_steps to skip such steps"
        )
