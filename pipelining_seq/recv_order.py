"""Early receives for torch's action runtime: a pass over a lowered order with comms.

torch's lowering (``_add_send_recv``) appends a rank's receive at the moment the
sender's compute is placed, which in the Seq1F1B-I/ZB orders usually means right
before the compute that needs it. On gloo a receive posted after its data arrived
costs a few milliseconds, and Seq1F1B has k times as many receives as 1F1B, so
``ScheduleSeq1F1B`` posts them ahead (``early_recv``). :func:`post_receives_early`
does the same for an action list: every ``RECV_F``/``RECV_B`` moves up as far as

* the previous receive from the same peer rank (messages between a pair of ranks
  match in posting order), and
* this rank's previous send: the action list must stay runnable under blocking
  receives (torch's ``_simulate_comms_compute``), and a receive moved above one of
  the rank's own sends could make the rank wait for a peer that needs that send
  first. Moving a receive only across compute, unshard/reshard and other receives
  adds no wait that any send depends on, so no order that ran can deadlock.

Each (stage, unit) has its own receive buffer in the stage (per-unit buffers, sized
when the receive is posted), so nothing else limits how early a receive is posted.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _compat

__all__ = ["post_receives_early", "recv_peer"]

_RECV_F = _compat.ComputationType.RECV_F
_RECV_B = _compat.ComputationType.RECV_B
_SEND_F = _compat.ComputationType.SEND_F
_SEND_B = _compat.ComputationType.SEND_B


def recv_peer(action: _compat.Action, stage_to_rank: Callable[[int], int]) -> int | None:
    """The rank a receive action comes from (None for any other action)."""
    if action.computation_type == _RECV_F:
        return stage_to_rank(action.stage_index - 1)
    if action.computation_type == _RECV_B:
        return stage_to_rank(action.stage_index + 1)
    return None


def _early(actions: list, stage_to_rank: Callable[[int], int]) -> list:
    out: list = []
    barrier = 0  # index in ``out`` after this rank's last send
    last_from: dict[int, int] = {}  # peer -> index in ``out`` after its last receive
    for a in actions:
        if a is None:
            out.append(a)
            continue
        ctype = a.computation_type
        if ctype in (_SEND_F, _SEND_B):
            out.append(a)
            barrier = len(out)
            continue
        peer = recv_peer(a, stage_to_rank)
        if peer is None:
            out.append(a)
            continue
        pos = max(barrier, last_from.get(peer, 0))
        out.insert(pos, a)
        # Everything recorded at or after ``pos`` shifted by one.
        last_from = {q: i + 1 if i > pos else i for q, i in last_from.items()}
        last_from[peer] = pos + 1
    return out


def post_receives_early(order: dict[int, list], stage_to_rank: Callable[[int], int]) -> dict[int, list]:
    """``order`` (per rank, torch's lowered action list) with each receive moved up as
    far as the rules of the module docs allow; compute actions keep their order."""
    return {rank: _early(list(actions), stage_to_rank) for rank, actions in order.items()}
