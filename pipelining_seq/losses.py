"""How the per-chunk losses of a micro-batch add up to its loss (shared by the Seq1F1B schedules).

A sequence-chunked schedule calls the loss function once per (micro-batch, chunk) unit.
With a per-token *mean* loss such as ``F.cross_entropy``, chunk j's loss is the mean over
its own counted targets, so it must be weighted by its share of the micro-batch's counted
targets for the weighted chunk losses to add up to the micro-batch's loss:

* integer targets (token ids): the share of targets ``!= ignore_index`` (prompt masking,
  padding), ``valid_j / valid_mb``; with no ``ignore_index`` entry this is ``len_j / S``;
* other targets: the share of tokens, ``len_j / S``; an ``ignore_index`` entry in such
  targets cannot be honoured and is refused;
* a micro-batch whose targets are all ignored keeps the length weights, so it gives what
  the loss function gives on the whole micro-batch (``cross_entropy``: NaN), as under
  ``Schedule1F1B``;
* a chunk with no counted target while others have some has weight 0; its loss (NaN for
  ``cross_entropy``) is replaced by a zero that keeps the output in the graph, so it adds
  nothing to the loss or to any gradient.

With a *sum* loss (``reduction="sum"``, or torchtitan's ``sum / global_tokens``) chunk
losses add up as they are and no weights apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._compat import tree_leaves

__all__ = ["chunk_loss_weights", "weight_chunk_loss"]


def _is_integer(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def chunk_loss_weights(
    unit_targets: Sequence[Any], *, n_chunks: int, lengths: Sequence[int], ignore_index: int | None,
) -> list[float]:
    """Weight of every unit's loss in ``"mean"`` mode; units ordered micro-batch-major.

    Args:
        unit_targets: the target of each unit (``n_microbatches * n_chunks`` entries).
        n_chunks: chunks per micro-batch.
        lengths: the chunk lengths.
        ignore_index: target value that does not count (None: every target counts).
    """
    k = n_chunks
    total = sum(lengths)
    by_length = [lengths[u % k] / total for u in range(len(unit_targets))]
    if ignore_index is None or not unit_targets:
        return by_length
    if not all(_is_integer(t) for t in unit_targets):
        for t in unit_targets:
            if isinstance(t, torch.Tensor) and t.dtype != torch.bool and bool((t == ignore_index).any()):
                raise ValueError(
                    f"ScheduleSeq1F1B: targets of dtype {t.dtype} contain ignore_index={ignore_index}, "
                    "which only integer targets can honour: pass integer targets, or "
                    "ignore_index=None to weight chunk losses by length"
                )
        return by_length
    counts = torch.stack([(t != ignore_index).sum() for t in unit_targets]).tolist()
    weights = []
    for n in range(len(unit_targets) // k):
        mb = counts[n * k:(n + 1) * k]
        valid = sum(mb)
        weights += by_length[n * k:(n + 1) * k] if valid == 0 else [c / valid for c in mb]
    return weights


def weight_chunk_loss(loss: torch.Tensor, output: Any, weight: float) -> torch.Tensor:
    """``loss * weight``; for weight 0 a zero that depends on ``output`` (zero gradients)."""
    if weight != 0:
        return loss * weight
    zero = loss.detach().new_zeros(())
    for t in tree_leaves(output):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            zero = zero + (t * 0).sum().to(zero.dtype)
    return zero
