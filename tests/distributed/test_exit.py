"""A rank ends cleanly: :func:`pipelining_seq.p2p.destroy_process_group` leaves no gloo
worker thread behind. A thread left alive into interpreter shutdown aborts the process
now and then ("terminate called without an active exception", SIGABRT) after all its work
is done; this checks the cause (the threads) instead of waiting for the rare abort."""

from __future__ import annotations

import json
import sys

import pytest
import torch.multiprocessing as mp

from pipelining_seq.tools.testing import free_port
from tests.workers.train_workers import exit_threads_worker

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")]


def test_no_gloo_thread_outlives_the_process_group(tmp_path):
    mp.start_processes(exit_threads_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        n = json.loads((tmp_path / f"threads{rank}.json").read_text())
        assert n["during"] > n["before"]  # the group's threads were there (the check can fail)
        assert n["after"] == n["before"], (rank, n)
