"""Seq1F1B-I and Seq1F1B-ZB on real gloo ranks equal a single-process run (float64),
and the runtime executes exactly the compute order of the schedule's IR."""

import pytest

from pipelining_seq.tools.testing import run_ranks
from tests.workers.parity_multi_worker import multi_parity_worker

TOL = 1e-10

CONFIGS = {
    2: [
        dict(schedule="ZB", m=2, k=4, batch=4, seq=16, partition=(5, 4, 4, 3),
             model=dict(activation_checkpoint=True), eval=True, steps=2, single=True),
        dict(schedule="ZB", m=3, k=3, batch=3, seq=24, partition="balanced"),
        dict(schedule="ZB", m=2, k=2, batch=2, seq=16, model=dict(activation_checkpoint=True, attn_backend="sdpa")),
        dict(schedule="I", v=2, m=2, k=4, batch=4, seq=16, partition=(5, 4, 4, 3),
             model=dict(activation_checkpoint=True), eval=True, steps=2),
        dict(schedule="I", v=3, m=3, k=3, batch=3, seq=24, partition="balanced"),  # k > p
        dict(schedule="I", v=2, m=4, k=1, batch=4, seq=8),
    ],
    3: [
        dict(schedule="ZB", m=2, k=4, batch=2, seq=16, partition=(5, 4, 4, 3),
             model=dict(activation_checkpoint=True), eval=True),
        dict(schedule="ZB", m=1, k=3, batch=2, seq=18, partition="balanced"),
        dict(schedule="I", v=2, m=2, k=2, batch=2, seq=16, partition=(9, 7),  # k does not divide p
             model=dict(activation_checkpoint=True), eval=True),
        dict(schedule="I", v=2, m=2, k=5, batch=2, seq=20, partition="balanced"),  # k > p
        dict(schedule="I", v=3, m=3, k=1, batch=3, seq=8),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(CONFIGS))
def test_multi_schedules_equal_reference(world):
    results = run_ranks(multi_parity_worker, world, CONFIGS[world], timeout_s=180)
    for i, cfg in enumerate(CONFIGS[world]):
        assert sum(r[i]["n_params"] for r in results) == results[0][i]["n_params_full"], cfg
    for rank, per_rank in enumerate(results):
        for res in per_rank:
            cfg = res["cfg"]
            assert res["grad"] < TOL, (rank, cfg, res["grad"])
            assert res["leftover"] == 0, (rank, cfg, "K/V cache not empty after the step")
            assert res["ran"] == res["ir"], (rank, cfg, "executor order differs from the IR")
            assert any(t in ("B", "I") for t, _, _ in res["ran"])
            if cfg["schedule"] == "ZB":
                assert {t for t, _, _ in res["ran"]} == {"F", "I", "W"}
            if rank == world - 1:
                assert res["n_losses"] == cfg["m"]
                assert res["loss"] < TOL, (cfg, res["loss"])
                if cfg.get("eval"):
                    assert res["n_evals"] == cfg["m"] and res["eval"] < TOL, (cfg, res["eval"])
