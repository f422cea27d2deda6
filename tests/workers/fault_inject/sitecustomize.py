"""Faults injected into spawned training ranks by the tests, never by the package.

A test puts this folder first on the ranks' ``PYTHONPATH`` (see
``fault_helpers.inject_env``); Python imports ``sitecustomize`` at start-up in every
process, and in a training rank (``RANK`` set) it wraps
:func:`pipelining_seq.p2p.note`, which the trainer calls at the start of every step:

* ``PIPELINING_SEQ_TEST_KILL_AFTER_STEP=N``: SIGKILL this rank when step N+1 begins,
  i.e. right after step N and its checkpoint completed.
"""

import os

_KILL_AFTER = os.environ.get("PIPELINING_SEQ_TEST_KILL_AFTER_STEP")

if _KILL_AFTER and "RANK" in os.environ:
    import signal
    import sys

    from pipelining_seq import p2p

    _note = p2p.note

    def _note_then_maybe_die(**fields):
        if fields.get("step") == int(_KILL_AFTER) + 1:
            sys.stderr.write(f"[rank{os.environ['RANK']}] test fault: killing rank after step {_KILL_AFTER}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        _note(**fields)

    p2p.note = _note_then_maybe_die
