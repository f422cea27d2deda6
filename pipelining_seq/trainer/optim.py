"""Optimizer, learning-rate schedule and gradient clipping of the training loop."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import JobConfig

__all__ = ["build_optimizer", "clip_grad_norm_", "lr_factor"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay_type: str, min_lr_factor: float) -> float:
    """LambdaLR factor after ``step`` scheduler steps, i.e. for training step ``step + 1``."""
    s = step + 1
    if warmup_steps and s <= warmup_steps:
        return s / warmup_steps
    if decay_type == "constant":
        return 1.0
    progress = min(max((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    if decay_type == "linear":
        return 1.0 - (1.0 - min_lr_factor) * progress
    return min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm_(
    parameters: Any, max_norm: float, *, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Clip gradients by their global L2 norm over all pipeline stages; return that norm.

    Each rank takes the norm of its own gradients (a DTensor norm is made whole with
    ``full_tensor``), squares it, and the squares are summed over ``pp_group``; every
    rank then scales by the same factor. ``max_norm <= 0`` only measures.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        raise RuntimeError("clip_grad_norm_: no parameter has a gradient on this rank")
    device = params[0].grad.device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for group in ([p.grad for p in params if isinstance(p.grad, DTensor)], [p.grad for p in params if not isinstance(p.grad, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            sq = sq + norm.float() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def build_optimizer(cfg: JobConfig, part: nn.Module):
    """AdamW (weight decay on matrices only) and its warm-up + decay LambdaLR for one stage."""
    o, s = cfg.optimizer, cfg.lr_scheduler
    decay = [p for p in part.parameters() if p.dim() >= 2]
    no_decay = [p for p in part.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    factor = functools.partial(
        lr_factor, warmup_steps=s.warmup_steps, total_steps=cfg.training.steps, decay_type=s.decay_type,
        min_lr_factor=s.min_lr_factor,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
