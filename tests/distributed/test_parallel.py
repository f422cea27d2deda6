"""Seq1F1B composed with FSDP2 and DTensor tensor parallelism: parity on CPU/gloo ranks.

Every layout runs one Seq1F1B step (k >= 2, uneven explicit partition) in float64 and is
compared with a single-process whole-sequence reference: each micro-batch's loss, every
parameter's gradient (DTensor grads gathered with ``full_tensor``), and the weights
after one AdamW step. A second step counts FSDP's all-gathers.
"""

from __future__ import annotations

import pytest

from pipelining_seq.models import GPTConfig
from pipelining_seq.parallel import tp_shard_dim, validate_layout
from pipelining_seq.tools.planner import stage_param_counts
from pipelining_seq.tools.testing import run_ranks

LAYOUTS_4 = [
    dict(name="pp2xdp2", pp=2, dp=2, tp=1, m=2, batch=8, seq=16, partition=(7, 5, 4)),
    dict(name="pp2xtp2", pp=2, dp=1, tp=2, m=2, batch=4, seq=16, partition=(5, 11)),
    dict(name="pp2xtp2-sp", pp=2, dp=1, tp=2, m=2, batch=4, seq=16, partition=(6, 4, 6), sp=True,
         model=dict(mlp="gelu", n_kv_heads=4)),
    # Negative control: resharding after forward all-gathers once per unit.
    dict(name="pp2xdp2-reshard", pp=2, dp=2, tp=1, m=2, batch=8, seq=16, partition=(7, 5, 4),
         reshard_after_forward=True),
    dict(name="pp2xdp2-bf16", pp=2, dp=2, tp=1, m=2, batch=8, seq=16, partition=(10, 6),
         mixed_precision=True),
    dict(name="probe-gelu", probe="gelu"),
    dict(name="tp-memory", tp_memory=True),
]
LAYOUTS_8 = [
    dict(name="pp2xdp2xtp2-sp", pp=2, dp=2, tp=2, m=2, batch=8, seq=16, partition=(6, 4, 6), sp=True),
]
EXACT = [c["name"] for c in LAYOUTS_4 + LAYOUTS_8 if "pp" in c and not c.get("mixed_precision")]


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    from tests.workers.parallel_worker import layout_worker

    out: dict[str, list[dict]] = {}
    for world, layouts in ((4, LAYOUTS_4), (8, LAYOUTS_8)):
        for per_rank in run_ranks(layout_worker, world, layouts, timeout_s=180):
            for r in per_rank:
                out.setdefault(r["name"], []).append(r)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_layout_matches_reference(results, name):
    ranks = results[name]
    world = {"pp2xdp2xtp2-sp": 8}.get(name, 4)
    assert len(ranks) == world
    for r in ranks:
        assert r["n_params"] == r["expected_params"] > 0
        assert r["grad"] < 1e-12, r
        assert r["weight"] < 1e-10, r
        assert len(r["lengths"]) >= 2 and len(set(r["lengths"])) > 1
    last = [r for r in ranks if r["stage"] == 1]
    assert last and all(r["loss"] is not None and r["loss"] < 1e-12 for r in last), last
    if "tp" in name:  # TP shards the projections: those parameters are DTensors
        assert all(r["dtensor_params"] > 0 for r in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp2xdp2", "pp2xdp2xtp2-sp"])
def test_fsdp_all_gathers_once_per_step(results, name):
    for r in results[name]:
        assert r["fsdp_groups"] == 3  # two blocks + the stage root
        assert r["fsdp_all_gathers"] == r["fsdp_groups"], r


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp2xdp2", "pp2xtp2", "pp2xtp2-sp", "pp2xdp2xtp2-sp"])
def test_planner_counts_the_real_shards(results, name):
    # The planner's per-rank parameter count (ceil-sharded, as rank 0 of each dimension
    # holds) equals what parallelize_stage actually left on that rank.
    from tests.workers.parallel_worker import MODEL

    layout = next(c for c in LAYOUTS_4 + LAYOUTS_8 if c["name"] == name)
    cfg = GPTConfig(**{**MODEL, **layout.get("model", {})})
    counts = stage_param_counts(cfg, pp=layout["pp"], tp=layout["tp"], dp_shard=layout["dp"])
    for r in results[name]:
        stage, d, t = r["coords"]
        if d == 0 and t == 0:
            key = "sharded" if layout["dp"] > 1 else "local"
            assert r["local_numel"] == counts[stage][key], (r, counts)


@pytest.mark.slow
def test_reshard_after_forward_would_gather_per_unit(results):
    # The control shows the count above can fail: every unit's forward and backward regather.
    for r in results["pp2xdp2-reshard"]:
        assert r["fsdp_all_gathers"] > r["units"], r


@pytest.mark.slow
def test_sequence_parallel_saves_only_the_shard(results):
    # input_reshard: the all-gathered input of a column-parallel projection is freed after
    # forward (its rank's slice is saved and gathered again in backward).
    for r in results["probe-gelu"]:
        assert r["kept"] and not any(r["kept"]), r


@pytest.mark.slow
def test_planner_activation_model_matches_tensor_parallel_saves(results):
    # Every tensor a TP=2 stack saves for backward (DTensor locals, input_reshard slices)
    # plus its K/V cache, per unit, against the planner's count: with and without
    # sequence parallelism, GELU and SwiGLU, fp32 and bf16.
    for r in results["tp-memory"]:
        assert len(r["units"]) == 16
        for u in r["units"]:
            assert u["measured"] == u["predicted"], u
            assert u["kv_cache"] > 0


@pytest.mark.slow
def test_mixed_precision_runs_in_bf16(results):
    for r in results["pp2xdp2-bf16"]:
        assert r["param_dtype"] == "torch.float32"  # sharded master weights
        assert r["grad"] < 0.05 * r["grad_scale"], r
        if r["stage"] == 1:
            assert r["output_dtype"] == "torch.bfloat16"
            assert r["rel_loss"] < 2e-2, r


def test_tp_shard_dims_follow_the_plan():
    assert tp_shard_dim("layers.3.attention.wq.weight") == 0
    assert tp_shard_dim("layers.3.feed_forward.w3.weight") == 0
    assert tp_shard_dim("layers.0.attention.wo.weight") == 1
    assert tp_shard_dim("layers.0.feed_forward.w2.weight") == 1
    assert tp_shard_dim("tok_embeddings.weight") == 0
    assert tp_shard_dim("output.weight") == 0
    assert tp_shard_dim("layers.0.attention_norm.weight") is None
    assert tp_shard_dim("norm.weight") is None


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(pp=2, dp_shard=2, tp=2, world_size=6), "multiply to the world size"),
        (dict(pp=2, dp_shard=1, tp=3, n_heads=4), "n_heads=4 is not divisible by tensor_parallel_degree=3"),
        (dict(pp=1, dp_shard=1, tp=4, n_heads=8, n_kv_heads=2), "n_kv_heads=2"),
        (dict(pp=8, dp_shard=1, tp=1, n_layers=4), "n_layers=4 cannot be split over pipeline_parallel_degree=8"),
        (dict(pp=2, dp_shard=1, tp=4, chunk_lengths=[6, 4, 6], sequence_parallel=True), "include [6, 6]"),
        (dict(pp=0, dp_shard=1, tp=1), "pipeline_parallel_degree=0"),
    ],
)
def test_bad_layouts_are_rejected(kwargs, needle):
    with pytest.raises(ValueError) as err:
        validate_layout(**kwargs)
    assert needle in str(err.value)


def test_good_layout_passes():
    validate_layout(pp=8, dp_shard=1, tp=8, world_size=64, n_layers=64, n_heads=64, n_kv_heads=64,
                    chunk_lengths=[23424, 16624, 13640, 11848], sequence_parallel=True)
    # Without sequence parallelism chunks need not divide by the TP degree.
    validate_layout(pp=2, dp_shard=1, tp=4, chunk_lengths=[6, 4, 6], sequence_parallel=False)
