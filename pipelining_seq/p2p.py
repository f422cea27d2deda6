"""Pipeline send/recv that say who was waiting on whom when a peer stalls or dies.

:func:`post` issues a batch of ``P2POp`` (torch's ``_batch_p2p``) and remembers what it
was; :func:`wait` waits for it and, when the wait fails (a process-group timeout on a
stopped peer, a closed connection from a killed one), raises :class:`PeerError` naming
this rank's stage, the peer rank(s), the training step (see :func:`note`) and the unit
(micro-batch, chunk) that was waiting, instead of gloo's bare
``Timed out waiting 600000ms for recv operation``. The wait is bounded by the process
group's timeout (``init_process_group(timeout=...)``), or by :func:`set_timeout` when set
(the trainer sets both from ``comm.timeout_s``; a script using the public API can call
``pipelining_seq.p2p.set_timeout(60)`` instead of waiting out the default 30 minutes).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from . import _compat

__all__ = ["PeerError", "Pending", "context", "note", "post", "set_timeout", "wait"]

logger = logging.getLogger(__name__)

# Where this process is: set by the schedule (stage, unit counts) and the trainer (step).
_CONTEXT: dict[str, Any] = {}


class PeerError(RuntimeError):
    """A send/recv with a pipeline peer failed or timed out."""


def set_timeout(seconds: float | None) -> None:
    """Bound every pipeline send/recv wait to ``seconds`` (None: the process group's timeout)."""
    if seconds is not None and seconds <= 0:
        raise ValueError(f"set_timeout({seconds}): give a positive number of seconds, or None")
    _CONTEXT["timeout_s"] = seconds


def note(**fields: Any) -> None:
    """Record where this process is (``step=``, ``stage=``, ``n_seq_chunks=``...), for messages."""
    _CONTEXT.update(fields)


def context() -> dict[str, Any]:
    return dict(_CONTEXT)


class Pending(list):
    """The works of one posted batch, with what they were for."""

    desc: str = ""
    unit: int | None = None
    ops: list = []


def post(ops: list, *, desc: str, unit: int | None = None) -> Pending:
    """Issue ``ops`` (a list of ``dist.P2POp``) as one batch; returns its works."""
    out = Pending(_compat.batch_p2p(ops, desc=desc) if ops else [])
    out.desc, out.unit, out.ops = desc, unit, list(ops)
    return out


def _peers(ops: list) -> list[int]:
    return sorted({int(op.peer) for op in ops if getattr(op, "peer", None) is not None})


def _where(unit: int | None) -> str:
    c = _CONTEXT
    parts = []
    if "stage" in c:
        parts.append(f"stage {c['stage']}")
    if "step" in c:
        parts.append(f"step {c['step']}")
    if unit is not None:
        k = c.get("n_seq_chunks") or 1
        parts.append(f"unit {unit} (micro-batch {unit // k}, chunk {unit % k})")
    return ", ".join(parts) or "pipeline"


def wait(works: list) -> None:
    """Wait for the works of :func:`post` (or a plain list of works); on failure raise
    :class:`PeerError` with stage, peer rank(s), step and unit."""
    if not works:
        return
    timeout = _CONTEXT.get("timeout_s")
    try:
        if timeout is None:
            _compat.wait_batch_p2p(works)
        else:
            for work in works:
                work.wait(timedelta(seconds=timeout))
    except RuntimeError as e:
        desc = getattr(works, "desc", "p2p")
        peers = _peers(getattr(works, "ops", []))
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        timed_out = "timed out" in reason.lower() or "timeout" in reason.lower()
        what = "no answer from" if timed_out else "lost the connection to"
        peer = f"rank {', '.join(map(str, peers))}" if peers else "its pipeline peer"
        hint = (
            "the peer is stalled (stopped, swapping or deadlocked) or much slower; raise comm.timeout_s "
            "if it is only slow" if timed_out else "the peer process died or closed its connection"
        )
        raise PeerError(
            f"{_where(getattr(works, 'unit', None))}: {desc} {what} {peer} ({reason}); {hint}"
        ) from e
