"""The schedule simulator: closed forms, dependencies, torch schedules, cost models, CLI."""

from __future__ import annotations

import json

import pytest

from pipelining_seq import schedule_ir
from pipelining_seq.cli import main as cli_main
from pipelining_seq.models import GPTConfig
from pipelining_seq.models.gpt import flop_model
from pipelining_seq.partition import balanced_partition
from pipelining_seq.tools import torch_schedules
from pipelining_seq.tools.simulate import (
    MODEL_PRESETS,
    Op,
    ScheduleOps,
    build_schedule_ops,
    closed_form_bubble,
    equal_costs,
    flop_costs,
    measured_costs,
    paper_comparison,
    simulate,
)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_seq1f1b_equal_cost_closed_form(p, m, k):
    plan = build_schedule_ops("Seq1F1B", pp=p, microbatches=m, chunks=k)
    res = simulate(plan, equal_costs(plan))
    # A unit costs 1/k forward and 2/k backward: makespan (mk + p - 1) * 3 / k.
    assert res.makespan == pytest.approx((m * k + p - 1) * 3 / k, rel=1e-12)
    assert res.bubble == pytest.approx(closed_form_bubble(p, m, k), rel=1e-12)
    assert res.bubble == pytest.approx((p - 1) / (m * k + p - 1), rel=1e-12)
    for r in range(p):
        assert res.peak_live_units[r] == min(p - r + k - 1, m * k)
        assert res.peak_live_units[r] == schedule_ir.peak_live_units(schedule_ir.compute_order(p, r, m, k))


@pytest.mark.parametrize("name", ["1F1B", "GPipe"])
@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (8, 16)])
def test_torch_single_stage_closed_form(name, p, m):
    plan = build_schedule_ops(name, pp=p, microbatches=m)
    res = simulate(plan, equal_costs(plan))
    assert res.bubble == pytest.approx((p - 1) / (m + p - 1), rel=1e-12)
    expected_live = [min(p - r, m) for r in range(p)] if name == "1F1B" else [m] * p
    assert res.peak_live_units == expected_live


def test_dependencies_hold_in_the_timeline():
    plan = build_schedule_ops("Seq1F1B", pp=3, microbatches=3, chunks=3)
    res = simulate(plan, equal_costs(plan), comm=0.1)
    end = {}
    for items in res.timeline.values():
        for op, start, stop in items:
            end[(op.stage, op.kind, op.unit)] = (start, stop)
    k = 3
    for (s, kind, u), (start, _) in end.items():
        if kind == "F":
            if s > 0:
                assert start >= end[(s - 1, "F", u)][1] + 0.1 - 1e-12  # activation, over the wire
            if u % k:
                assert start >= end[(s, "F", u - 1)][1]  # K/V of the earlier chunk
        else:
            assert start >= end[(s, "F", u)][1]
            if s < 2:
                assert start >= end[(s + 1, "B", u)][1] + 0.1 - 1e-12
            if u % k < k - 1:
                assert start >= end[(s, "B", u + 1)][1]  # K/V gradients of the later chunk


def test_forward_chunk_order_backward_deadlocks():
    # Backward in forward chunk order cannot satisfy the K/V-gradient dependency.
    p, m, k = 2, 1, 2
    ops = {r: [Op("F", r, 0), Op("F", r, 1), Op("B", r, 0), Op("B", r, 1)] for r in range(p)}
    plan = ScheduleOps("bad", p, p, m, k, ops)
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(plan, equal_costs(plan))


@pytest.mark.parametrize("name", ["Interleaved1F1B", "ZBVZeroBubble", "InterleavedZeroBubble"])
def test_torch_multi_stage_schedules_play(name):
    p, m = 4, 8
    plan = build_schedule_ops(name, pp=p, microbatches=m)
    assert plan.num_stages == 2 * p
    res = simulate(plan, equal_costs(plan))
    # Every rank does m micro-batches of forward (1) and backward (2) work.
    assert res.busy == pytest.approx([3.0 * m] * p)
    assert res.bubble < closed_form_bubble(p, m)  # both beat plain 1F1B
    if name == "ZBVZeroBubble":
        assert plan.ops[0][0].stage == 0 and {op.stage for op in plan.ops[0]} == {0, 2 * p - 1}


def test_torch_schedule_actions_cover_every_microbatch():
    for name in ("GPipe", "Interleaved1F1B", "ZBVZeroBubble"):
        acts = torch_schedules.torch_schedule_actions(name, 4, 5)
        for r, ops in acts.items():
            for s in torch_schedules.torch_schedule_stages(name, 4, r):
                assert sorted(a.unit for a in ops if a.stage == s and a.kind == "F") == list(range(5))


def test_flop_model_balanced_beats_uniform():
    model = MODEL_PRESETS["7b"]
    plan = build_schedule_ops("Seq1F1B", pp=4, microbatches=8, chunks=4)
    dims = dict(num_layers=32, hidden_size=4096, num_heads=32, ffn_hidden_size=16384, vocab_size=51200)
    lengths = balanced_partition(32768, 4, **dims, multiple_of=8)
    assert lengths == [11024, 8416, 7088, 6240]  # the paper's own split
    uni = simulate(plan, flop_costs(plan, model, [8192] * 4))
    bal = simulate(plan, flop_costs(plan, model, lengths))
    base_plan = build_schedule_ops("1F1B", pp=4, microbatches=8)
    base = simulate(base_plan, flop_costs(base_plan, model, [32768]))
    assert bal.makespan < uni.makespan < base.makespan
    assert bal.bubble < 0.5 * base.bubble
    # Same total work whatever the schedule: the layer FLOPs of the sequence.
    assert sum(bal.busy) == pytest.approx(sum(base.busy), rel=1e-9)
    assert sum(uni.busy) == pytest.approx(sum(base.busy), rel=1e-9)
    # That work is the FLOP model's (forward + 2 x backward), less the embedding the paper counts.
    work = 3 * (flop_model(model).chunk_cost(32768, 32768) - 2 * 32768 * 4096 * 51200) / 1e9
    assert sum(base.busy) == pytest.approx(8 * work, rel=1e-9)


def test_flop_costs_follow_the_models_shape():
    """A GQA/SwiGLU model costs less per token than its MHA/GELU twin of the same width."""
    plan = build_schedule_ops("Seq1F1B", pp=2, microbatches=2, chunks=2)
    mha = GPTConfig(n_layers=3, dim=256, n_heads=8, vocab_size=1000, ffn_dim=688, mlp="gelu")
    gqa = GPTConfig(n_layers=3, dim=256, n_heads=8, n_kv_heads=2, vocab_size=1000, ffn_dim=688, mlp="swiglu")
    a, b = flop_costs(plan, mha, [600, 424]), flop_costs(plan, gqa, [600, 424])
    # 3 layers over 2 stages: 2 and 1; the head on stage 1.
    fm = flop_model(gqa)
    assert b.fwd[0][1] == pytest.approx(2 * fm.layer_cost(424, 1024) / 1e9)
    assert b.fwd[1][0] == pytest.approx((fm.layer_cost(600, 600) + fm.head_cost(600)) / 1e9)
    # SwiGLU's third matrix outweighs GQA's smaller K/V here: 2*256*688 > 2*2*256*(256-64).
    assert b.fwd[0][0] > a.fwd[0][0]



def test_split_backward_w_is_the_weight_gradient_flops():
    """W is each weight matrix's product (the forward's projections, MLP and head), I the
    rest of the backward; so W's share falls as attention grows with the sequence, and the
    simulated zero-bubble gain with it."""
    plan = build_schedule_ops("Seq1F1BZeroBubble", pp=2, microbatches=2, chunks=2)
    cfg = MODEL_PRESETS["cpu-bench"]
    fm = flop_model(cfg)
    cost = flop_costs(plan, cfg, [600, 424])
    assert cost.split_backward(0, 1) == pytest.approx(
        (cost.bwd[0][1] - 2 * fm.token_flops * 424 / 1e9, 2 * fm.token_flops * 424 / 1e9))
    assert cost.split_backward(1, 0)[1] == pytest.approx(2 * fm.token_flops * 600 / 1e9 + fm.head_cost(600) / 1e9)
    kinds = {op.kind for ops in plan.ops.values() for op in ops}
    assert {"I", "W"} <= kinds
    for ops in plan.ops.values():
        for op in ops:
            if op.kind in "IW":
                i, w = cost.split_backward(op.stage, op.unit % 2)
                assert i + w == pytest.approx(cost.bwd[op.stage][op.unit % 2]) and 0 < w < i

    def w_share(seq_len: int) -> float:
        c = flop_costs(plan, cfg, [seq_len // 2] * 2)
        return c.split_backward(0, 1)[1] / c.bwd[0][1]

    assert w_share(8192) < w_share(2048) < w_share(512) < 0.5

    # At 32k tokens the 7B's W is a quarter of its backward, not half: less to fill bubbles with.
    spans = {}
    for name in ("Seq1F1B", "Seq1F1BZeroBubble"):
        pl = build_schedule_ops(name, pp=4, microbatches=8, chunks=4)
        c = flop_costs(pl, MODEL_PRESETS["7b"], [8192] * 4)
        spans[name] = simulate(pl, c).makespan
        if name == "Seq1F1BZeroBubble":
            assert c.split_backward(0, 3)[1] < c.bwd[0][3] / 4
            c.w = None
            spans["half"] = simulate(pl, c).makespan
    assert spans["half"] < spans["Seq1F1BZeroBubble"] < spans["Seq1F1B"]
    # Equal costs without a model keep the half-and-half split.
    eq = equal_costs(plan)
    assert eq.split_backward(0, 0) == (eq.bwd[0][0] / 2, eq.bwd[0][0] / 2)

def test_measured_costs_and_chunk_mismatch():
    plan = build_schedule_ops("Seq1F1B", pp=2, microbatches=2, chunks=2)
    cost = measured_costs(plan, dict(lengths=[6, 4], fwd=[1.0, 1.0], bwd=[2.0, 2.0]))
    assert simulate(plan, cost).bubble == pytest.approx(closed_form_bubble(2, 2, 2))
    assert cost.act[0] == pytest.approx([0.6, 0.4])
    with pytest.raises(ValueError, match="chunks"):
        measured_costs(plan, dict(lengths=[10], fwd=[1.0], bwd=[2.0]))



def test_measured_costs_split_w_by_the_timed_models_flops():
    """Measured times carry no I/W split: W is the timed model's weight-gradient share of
    each chunk's backward under the FLOP model, found in the bench JSON's metadata."""
    from dataclasses import asdict

    from pipelining_seq.tools.simulate import _times_model

    plan = build_schedule_ops("Seq1F1BZeroBubble", pp=2, microbatches=2, chunks=2)
    cfg = MODEL_PRESETS["cpu-bench"]
    entry = dict(lengths=[1400, 648], fwd=[1.0, 1.0], bwd=[2.0, 2.0])
    assert measured_costs(plan, entry).split_backward(0, 0) == (1.0, 1.0)  # no model: half
    cost = measured_costs(plan, entry, scope="model", model=cfg)
    fm = flop_model(cfg)
    for j, (s, e) in enumerate([(1400, 1400), (648, 2048)]):
        f = cfg.n_layers * fm.layer_cost(s, e) + fm.head_cost(s)  # forward: layers and head
        w = cfg.n_layers * fm.token_flops * s + fm.head_cost(s)  # their weights' products
        share = w / (2 * f)
        assert cost.split_backward(0, j)[1] == pytest.approx(cost.bwd[0][j] * share)
    assert cost.split_backward(0, 1)[1] < cost.split_backward(0, 0)[1] < 0.5  # later chunks: more attention
    assert _times_model({"meta": {"model": {"model": asdict(cfg), "seq_len": 2048}}}) == cfg
    assert _times_model({"report": {"config": {"model": asdict(cfg)}}}) == cfg
    assert _times_model({"meta": {}}) is None

def test_paper_comparison_rows():
    rows = paper_comparison(pps=(4,), chunks=4)
    assert len(rows) == 4
    for r in rows:
        assert r["sim_vs_1f1b"] > 1.0 and r["bubble_seq"] < r["bubble_1f1b"]
    m8 = {r["seq_len"]: r for r in rows if r["microbatches"] == 8}
    assert m8[32768]["paper_vs_1f1b"] == pytest.approx(110.62 / 99.67)


def test_cli_table_json_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "t.png", tmp_path / "t.json"
    rc = cli_main(["simulate", "--pp", "4", "-m", "8", "-k", "4", "--schedule", "Seq1F1B,1F1B,ZBVZeroBubble",
                   "--png", str(png), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Seq1F1B" in out and "0.086" in out and "0.273" in out
    rows = json.loads(js.read_text())
    assert [r["schedule"] for r in rows] == ["Seq1F1B", "1F1B", "ZBVZeroBubble"]
    assert png.stat().st_size > 1000


def test_cli_times_file(tmp_path, capsys):
    times = dict(partitions={
        "full": dict(lengths=[8], fwd=[4.0], bwd=[8.0]),
        "uniform@2": dict(lengths=[4, 4], fwd=[1.5, 2.5], bwd=[3.0, 5.0]),
    })
    path = tmp_path / "times.json"
    path.write_text(json.dumps(times))
    assert cli_main(["simulate", "--pp", "2", "-m", "2", "-k", "2", "--times", str(path)]) == 0
    assert "measured" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match="balanced"):
        cli_main(["simulate", "--pp", "2", "-m", "2", "-k", "2", "--times", str(path), "--partition", "balanced"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="microbatches"):
        build_schedule_ops("1F1B", pp=4, microbatches=2)
    with pytest.raises(ValueError, match="choose from"):
        build_schedule_ops("Nope", pp=2, microbatches=2)
    with pytest.raises(SystemExit, match="needs --model"):
        cli_main(["simulate", "--partition", "balanced"])


def test_receive_latency_hits_units_received_late():
    plan = build_schedule_ops("Seq1F1B", pp=2, microbatches=2, chunks=4)
    cost = equal_costs(plan)
    base = simulate(plan, cost)
    late = simulate(plan, cost, recv_latency=0.05)
    first = {(op.kind, op.unit): (a, b) for op, a, b in late.timeline[1]}
    # Rank 1's second forward waits for its own first one plus the late receive.
    assert first[("F", 1)][0] == pytest.approx(first[("F", 0)][1] + 0.05)
    assert late.makespan > base.makespan
    # A rank with no remote inputs (the first stage's forwards) pays nothing.
    assert late.timeline[0][1][1] == pytest.approx(base.timeline[0][1][1])


def test_measured_scope_model_splits_over_stages():
    plan = build_schedule_ops("Seq1F1B", pp=2, microbatches=1, chunks=2)
    entry = dict(lengths=[4, 4], fwd=[1.0, 1.0], bwd=[2.0, 2.0])
    whole = measured_costs(plan, entry, scope="model")
    stage = measured_costs(plan, entry)
    assert whole.fwd[0] == [0.5, 0.5] and stage.fwd[0] == [1.0, 1.0]
    with pytest.raises(ValueError, match="scope"):
        measured_costs(plan, entry, scope="rank")
