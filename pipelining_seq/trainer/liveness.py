"""Process lifetime of a training rank: its launcher's death, SIGINT/SIGTERM, and errors.

* **Launcher death.** Each rank remembers its parent (torchrun's agent) and a daemon
  thread checks once a second that the parent is still there; when it is gone (killed
  with SIGKILL, so it could not stop its workers) the rank logs one line and exits,
  instead of training on as an orphan that keeps writing checkpoints.
  ``pipelining-seq run`` in turn ties torchrun to itself (``PR_SET_PDEATHSIG``).
* **SIGINT / SIGTERM.** The first signal sets a flag; the ranks agree on it at the next
  step boundary (:class:`pipelining_seq.trainer.nonfinite.StepGuard`), save a checkpoint there
  when ``checkpoint.save_on_signal``, and end with one line. A second signal, or no step
  boundary within ``comm.timeout_s`` + 30 s (a rank blocked on a dead peer), exits at once.
* **Errors.** :func:`describe_failure` turns the errors a rank can die of into one line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

__all__ = ["describe_failure", "install", "stop_requested", "stop_signal"]

logger = logging.getLogger(__name__)

_STATE: dict[str, Any] = {"signal": None}


def stop_requested() -> bool:
    """True once SIGINT/SIGTERM reached this process (after :func:`install`)."""
    return _STATE["signal"] is not None


def stop_signal() -> str | None:
    sig = _STATE["signal"]
    return signal.Signals(sig).name if sig is not None else None


def _hard_exit(code: int, line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _on_signal(signum: int, frame: Any) -> None:
    rank = os.environ.get("RANK", "0")
    if _STATE["signal"] is not None:
        _hard_exit(128 + signum, f"[rank{rank}] second {signal.Signals(signum).name}: exiting now")
    _STATE["signal"] = signum
    grace = _STATE.get("grace_s", 210.0)

    def deadline() -> None:
        time.sleep(grace)
        _hard_exit(
            128 + signum,
            f"[rank{rank}] {signal.Signals(signum).name}: no step boundary within {grace:.0f}s (blocked on a peer?): exiting now",
        )

    threading.Thread(target=deadline, name="pipelining-seq-signal-deadline", daemon=True).start()


def _watch_parent(parent: int, period_s: float) -> None:
    while True:
        time.sleep(period_s)
        if os.getppid() != parent:
            rank = os.environ.get("RANK", "0")
            _hard_exit(
                137, f"[rank{rank}] the launcher (pid {parent}) is gone: ending this rank (pid {os.getpid()})"
            )


def install(*, timeout_s: float, watch_parent: bool = True, period_s: float = 1.0) -> None:
    """Signal handlers and the parent watch of a rank (call once, from the main thread)."""
    _STATE["grace_s"] = timeout_s + 30.0
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    parent = os.getppid()
    if watch_parent and parent > 1:
        threading.Thread(
            target=_watch_parent, args=(parent, period_s), name="pipelining-seq-parent-watch", daemon=True
        ).start()


def describe_failure(err: BaseException, *, where: dict[str, Any]) -> str:
    """One line for an error that ends a rank (``where``: the p2p context, e.g. step)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    low = text.lower()
    if ("timed out" in low or "timeout" in low) and "stage" not in low:
        step = f" at step {where['step']}" if "step" in where else ""
        return (
            f"a collective{step} timed out after comm.timeout_s ({text[:160]}): another rank is stalled, dead or much "
            "slower; raise comm.timeout_s if it is only slow"
        )
    if ("connection" in low or "closed" in low or "broken pipe" in low) and "stage" not in low:
        step = f" at step {where['step']}" if "step" in where else ""
        return f"lost a peer{step} ({text[:160]}): another rank died"
    return text
