"""Quick checks of the fault machinery without processes: the step guard, the p2p wait
messages, the dump-folder lock and the agreement diff (marker ``faults``)."""

from __future__ import annotations

import os

import pytest
import torch

from pipelining_seq import agreement, p2p
from pipelining_seq.trainer import lock
from pipelining_seq.trainer.nonfinite import NonFiniteError, StepGuard

pytestmark = pytest.mark.faults


def test_guard_stops_on_nan_naming_step_and_value_or_skips_within_budget():
    g = StepGuard(skip_budget=0, reporting=True, device=torch.device("cpu"))
    assert g.check(step=1, loss=torch.tensor(2.5), grad_norm=torch.tensor(1.0), stop_requested=False).update
    with pytest.raises(NonFiniteError, match=r"step 7: loss nan, gradient norm 1\.0 .*training\.skip_nonfinite_steps"):
        g.check(step=7, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0), stop_requested=False)
    g = StepGuard(skip_budget=1, reporting=True, device=torch.device("cpu"))
    v = g.check(step=3, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")), stop_requested=True)
    assert not v.update and v.stop
    with pytest.raises(NonFiniteError, match=r"step 4: .*inf.*\[3\] were skipped"):
        g.check(step=4, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")), stop_requested=False)


class _Op:
    def __init__(self, peer):
        self.peer = peer


class _Work:
    def __init__(self, err):
        self.err = err

    def wait(self, *args, **kwargs):
        raise self.err


def test_p2p_wait_names_stage_peer_step_and_unit():
    p2p.note(stage=1, step=7, n_seq_chunks=4)
    works = p2p.Pending([_Work(RuntimeError("[../gloo/transport] Timed out waiting 5000ms for recv operation"))])
    works.desc, works.unit, works.ops = "bwd_recv", 5, [_Op(0)]
    with pytest.raises(p2p.PeerError) as e:
        p2p.wait(works)
    msg = str(e.value)
    for words in ("stage 1", "step 7", "unit 5 (micro-batch 1, chunk 1)", "bwd_recv", "no answer from rank 0",
                  "comm.timeout_s"):
        assert words in msg, msg
    works = p2p.Pending([_Work(RuntimeError("Connection closed by peer"))])
    works.desc, works.unit, works.ops = "fwd_recv", 0, [_Op(2)]
    with pytest.raises(p2p.PeerError, match="lost the connection to rank 2.*died"):
        p2p.wait(works)
    p2p.wait([])  # nothing posted: nothing to wait for


def test_p2p_set_timeout_bounds_each_wait():
    seen = []

    class Work:
        def wait(self, *args):
            seen.append(args)

    try:
        p2p.set_timeout(2.5)
        p2p.wait(p2p.Pending([Work(), Work()]))
        assert [a[0].total_seconds() for a in seen] == [2.5, 2.5]
        with pytest.raises(ValueError, match="positive"):
            p2p.set_timeout(0)
        p2p.set_timeout(None)
        seen.clear()
        p2p.wait(p2p.Pending([Work()]))
        assert seen == [()]  # the process group's own timeout
        for bad in (float("nan"), float("inf"), -1):
            with pytest.raises(ValueError, match="finite"):
                p2p.set_timeout(bad)
    finally:
        p2p.set_timeout(p2p.DEFAULT_TIMEOUT_S)


def test_lock_refuses_a_second_holder_with_pid_and_start_time(tmp_path):
    folder = str(tmp_path / "dump")
    assert lock.holder(folder) is None
    with lock.hold(folder, command="first"):
        info = lock.holder(folder)
        assert info["pid"] == os.getpid() and "UTC" in info["started"]
        with pytest.raises(lock.FolderBusyError, match=rf"in use by another run \(pid {os.getpid()} on .*started"):
            with lock.hold(folder):
                pass
    assert lock.holder(folder) is None  # released with the block (and by the kernel on any death)


def test_agreement_names_the_first_difference():
    same = {"a": 1, "b": [1, 2]}
    assert agreement.first_difference([same, dict(same)]) is None
    key, groups = agreement.first_difference([same, {"a": 1, "b": [2, 1]}, same])
    assert key == "b" and sorted(groups.values()) == [[0, 2], [1]]
    import functools

    from pipelining_seq.partition import balanced_partition

    d = agreement.describe_partition(functools.partial(balanced_partition, n_chunks=4, num_layers=2))
    assert d["callable"].endswith("balanced_partition") and d["kwargs"] == {"n_chunks": 4, "num_layers": 2}
