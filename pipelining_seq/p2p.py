"""Pipeline send/recv that say who was waiting on whom when a peer stalls or dies.

:func:`post` issues a batch of ``P2POp`` (torch's ``_batch_p2p``) and remembers what it
was; :func:`wait` waits for it and, when the wait fails (a process-group timeout on a
stopped peer, a closed connection from a killed one), raises :class:`PeerError` naming
this rank's stage, the peer rank(s), the training step (see :func:`note`) and the unit
(micro-batch, chunk) that was waiting, instead of gloo's bare
``Timed out waiting 600000ms for recv operation``. Every wait is bounded: by
:data:`DEFAULT_TIMEOUT_S` (300 s) unless :func:`set_timeout` says otherwise (the trainer
sets ``comm.timeout_s``; ``set_timeout(None)`` leaves it to the process group's timeout,
torch's default being 30 minutes). The schedules' collectives (the first-step agreement's
``all_gather``, the chunk-length exchange) wait through :func:`wait_collective`, with the
same message.
"""

from __future__ import annotations

import gc
import logging
import math
from datetime import timedelta
from typing import Any

from . import _compat

__all__ = ["DEFAULT_TIMEOUT_S", "PeerError", "Pending", "context", "destroy_process_group", "note", "post",
           "set_timeout", "wait", "wait_collective"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a pipeline wait lasts before a silent peer is reported (see :func:`set_timeout`)."""

# Where this process is: set by the schedule (stage, unit counts) and the trainer (step).
_CONTEXT: dict[str, Any] = {"timeout_s": DEFAULT_TIMEOUT_S}


class PeerError(RuntimeError):
    """A send/recv with a pipeline peer failed or timed out."""


def set_timeout(seconds: float | None) -> None:
    """Bound every pipeline wait to ``seconds`` (default :data:`DEFAULT_TIMEOUT_S`; None: the
    process group's own timeout)."""
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"set_timeout({seconds!r}): give a positive, finite number of seconds, or None")
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
    peers: list[int] | None = None
    """The ranks waited on when there are no ops (a collective)."""


def post(ops: list, *, desc: str, unit: int | None = None) -> Pending:
    """Issue ``ops`` (a list of ``dist.P2POp``) as one batch; returns its works (a peer
    already gone fails here, with :func:`wait`'s message)."""
    out = Pending()
    out.desc, out.unit, out.ops = desc, unit, list(ops)
    try:
        out.extend(_compat.batch_p2p(ops, desc=desc) if ops else [])
    except RuntimeError as e:
        raise _peer_error(out, e) from e
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
    try:
        _wait_works(works, _CONTEXT.get("timeout_s"))
    except RuntimeError as e:
        raise _peer_error(works, e) from e


def _wait_works(works: list, timeout: float | None) -> None:
    """The one place this package blocks on p2p works (the step-time breakdown times it)."""
    if timeout is None:
        _compat.wait_batch_p2p(works)
    else:
        for work in works:
            work.wait(timedelta(seconds=timeout))


def _peer_error(works: list, e: RuntimeError) -> PeerError:
    desc = getattr(works, "desc", "p2p")
    peers = getattr(works, "peers", None) or _peers(getattr(works, "ops", []))
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    timed_out = "timed out" in reason.lower() or "timeout" in reason.lower()
    what = "no answer from" if timed_out else "lost the connection to"
    peer = f"rank {', '.join(map(str, peers))}" if peers else "its pipeline peer"
    hint = (
        "the peer is stalled (stopped, swapping or deadlocked), much slower, or never made this call; raise "
        "comm.timeout_s (pipelining_seq.p2p.set_timeout in a script) if it is only slow" if timed_out
        else "the peer process died or closed its connection"
    )
    return PeerError(f"{_where(getattr(works, 'unit', None))}: {desc} {what} {peer} ({reason}); {hint}")


def wait_collective(work: Any, *, desc: str, group: Any = None) -> None:
    """Wait for an ``async_op=True`` collective of ``group`` within the pipeline's bound;
    on failure raise :class:`PeerError` naming stage, step and the group's other ranks."""
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    pending = Pending([work])
    pending.desc = desc
    pending.peers = sorted(r for r in ranks if r != dist.get_rank()) or None
    wait(pending)


def destroy_process_group() -> None:
    """``torch.distributed.destroy_process_group()``, then join gloo's worker threads while
    Python is still alive.

    Destroying the groups leaves their C++ objects (and each one's worker threads) alive in
    reference cycles until the interpreter's final collection. A worker thread that drops
    the last reference of a finished send/recv in that window needs the GIL to free the
    work's tensors, and a thread taking the GIL during interpreter shutdown is ended by
    ``pthread_exit`` through a ``noexcept`` frame: the rank aborts with "terminate called
    without an active exception" after all its work is done (seen about once in 15 runs of
    a 2-rank job on 2 cores). Collecting the cycles here runs the groups' destructors,
    which join the threads, before shutdown begins.
    """
    import torch.distributed as dist

    dist.destroy_process_group()
    gc.collect()
