"""Pipelined loss and gradients equal a single-process full-sequence run (float64).

Real gloo ranks, real P2P. Each spawned group runs a list of configurations to keep the
process start-up cost (a few seconds per group) out of the suite's time.
"""

import pytest

from pipelining_seq.tools.testing import run_ranks
from tests.workers.parity_worker import parity_worker

TOL = 1e-10

CONFIGS = {
    2: [
        dict(m=1, k=2, batch=2, seq=16),
        dict(m=4, k=1, batch=4, seq=16),
        dict(m=2, k=4, batch=4, seq=16, partition=(5, 4, 4, 3)),
        dict(m=3, k=3, batch=3, seq=24, partition="balanced"),
        dict(m=2, k=5, batch=2, seq=20),  # k > m, odd k
        dict(m=2, k=2, batch=4, seq=16, model=dict(activation_checkpoint=True), eval=True),
    ],
    3: [
        dict(m=1, k=3, batch=2, seq=18),
        dict(m=3, k=1, batch=3, seq=12),
        dict(m=2, k=4, batch=2, seq=24, partition="balanced"),
        dict(m=2, k=3, batch=2, seq=12, partition=(6, 5, 1), model=dict(activation_checkpoint=True)),
        dict(m=2, k=2, batch=2, seq=16, eval=True, model=dict(attn_backend="sdpa")),
        dict(m=2, k=4, batch=2, seq=16, partition=(5, 4, 4, 3), early_recv=False),
    ],
    4: [
        dict(m=1, k=4, batch=2, seq=16, partition=(7, 5, 3, 1), eval=True),
        dict(m=4, k=1, batch=4, seq=12),
        dict(m=2, k=3, batch=2, seq=18, partition="balanced", model=dict(activation_checkpoint=True)),
        dict(m=8, k=2, batch=8, seq=8),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(CONFIGS))
def test_pipelined_equals_reference(world):
    results = run_ranks(parity_worker, world, CONFIGS[world])
    n_params = sum(r[0]["n_params"] for r in results)
    assert n_params == results[0][0]["n_params_full"]
    for rank, per_rank in enumerate(results):
        for res in per_rank:
            cfg = res["cfg"]
            assert res["grad"] < TOL, (rank, cfg, res)
            assert res["leftover"] == 0, (rank, cfg, "K/V cache not empty after the step")
            if rank == world - 1:
                assert res["n_losses"] == cfg["m"]
                assert res["loss"] < TOL, (cfg, res)
                if cfg.get("eval"):
                    assert res["n_evals"] == cfg["m"] and res["eval"] < TOL, (cfg, res)
