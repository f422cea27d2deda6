"""Benchmarks at smoke size: calibration maths, the four bench commands, their outputs."""

from __future__ import annotations

import json

import pytest
import torch

from pipelining_seq.cli import main as cli_main
from pipelining_seq.models import GPTConfig, cross_entropy_loss
from pipelining_seq.partition import balanced_partition
from pipelining_seq.schedule_ir import compute_order
from pipelining_seq.tools.bench.common import BenchModel, make_batch, make_model
from pipelining_seq.tools.bench.memory import expected_peak
from pipelining_seq.tools.calibration import LinearChunkCost, fit_chunk_cost, linear_fit_partition, time_chunks
from pipelining_seq.tools.calibration import time_chunk as real_time_chunk
from pipelining_seq.tools.calibration import time_chunks as real_time_chunks

DIMS_7B = dict(num_layers=32, hidden_size=4096, num_heads=32, ffn_hidden_size=16384, vocab_size=51200)


def test_fit_recovers_coefficients():
    truth = LinearChunkCost(a1=3e-8, a2=2e-5, b=4e-3, a3=5e-9)
    samples = [(s, e, truth.predict(s, e)) for s in (64, 128, 256, 512) for e in (512, 1024) if e >= s]
    fit = fit_chunk_cost(samples, diagonal=True)
    for name in ("a1", "a2", "b", "a3"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    paper = fit_chunk_cost([(s, e, LinearChunkCost(3e-8, 2e-5, 4e-3).predict(s, e)) for s, e, _ in samples])
    assert paper.a3 == 0.0 and paper.a1 == pytest.approx(3e-8, rel=1e-6)
    with pytest.raises(ValueError, match="length <= end"):
        fit_chunk_cost([(10, 5, 1.0)] * 3)


def test_linear_fit_with_flop_coefficients_is_the_paper_partition():
    d = DIMS_7B
    alpha = (4 * d["hidden_size"] / d["num_heads"] + 3) * d["num_heads"]
    beta = 8 * d["hidden_size"] ** 2 + 4 * d["hidden_size"] * d["ffn_hidden_size"]
    cost = LinearChunkCost(a1=d["num_layers"] * alpha, a2=4 * d["hidden_size"] * d["vocab_size"] + d["num_layers"] * beta,
                           b=0.0)
    for seq, k in ((32768, 4), (65536, 4), (32768, 8)):
        ours = linear_fit_partition(seq, k, cost)
        ref = balanced_partition(seq, k, **d)
        assert sum(ours) == seq
        # Both cut from the end; ours bisects the bound on the integer lengths, so its
        # dearest chunk is never dearer than the closed form's floored one.
        assert max(abs(a - b) for a, b in zip(ours, ref)) <= 2 * k
        assert max(_chunk_costs(cost, ours)) <= max(_chunk_costs(cost, ref))


def test_linear_fit_partition_equalises_the_diagonal_form():
    cost = LinearChunkCost(a1=9e-8, a2=7e-5, b=5e-3, a3=1e-8)
    for k in (2, 4, 8):
        lengths = linear_fit_partition(2048, k, cost, multiple_of=1)
        ends = [sum(lengths[: j + 1]) for j in range(k)]
        costs = [cost.predict(s, e) for s, e in zip(lengths, ends)]
        assert sum(lengths) == 2048 and lengths == sorted(lengths, reverse=True)
        assert max(costs) / min(costs) < 1.01
    with pytest.raises(ValueError, match="cannot cut"):
        linear_fit_partition(10, 4, cost, multiple_of=8)


def _chunk_costs(cost: LinearChunkCost, lengths: list[int]) -> list[float]:
    return [cost.predict(s, sum(lengths[: j + 1])) for j, s in enumerate(lengths)]


def _best_max_cost(seq: int, k: int, cost: LinearChunkCost, mult: int) -> float:
    """Exact min over every allowed split of the dearest chunk's cost (dynamic programme)."""
    rem, units = seq % mult, seq // mult
    pos = lambda u: rem + u * mult  # noqa: E731 - cut positions: every chunk but the first is mult-long
    best = {u: cost.predict(pos(u), pos(u)) for u in range(1, units + 1)}  # one chunk covering [0, pos(u))
    for _ in range(k - 1):
        best = {e: min(max(best[u], cost.predict(pos(e) - pos(u), pos(e))) for u in best if u < e)
                for e in range(2, units + 1) if any(u < e for u in best)}
    return best[units]


def test_linear_fit_partition_returns_the_best_split_for_any_non_negative_model():
    # The fitted model of a smoke bench run that had no "equal-cost split" (the per-chunk
    # overhead b dominates the 256-token sequence).
    seen = LinearChunkCost(a1=1.39e-07, a2=2.65e-05, b=0.00797, a3=3.75e-08)
    for mult in (1, 8):
        lengths = linear_fit_partition(256, 4, seen, multiple_of=mult)
        assert sum(lengths) == 256 and all(s % mult == 0 for s in lengths)
        assert max(_chunk_costs(seen, lengths)) == pytest.approx(_best_max_cost(256, 4, seen, mult), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        # Each coefficient zero or spread over six decades; lengths and chunk counts small
        # enough to check against the exact optimum.
        coef = [0.0 if torch.rand(1, generator=gen).item() < 0.25 else
                10 ** (-9 + 6 * torch.rand(1, generator=gen).item()) for _ in range(4)]
        cost = LinearChunkCost(a1=coef[0], a2=coef[1], b=coef[2], a3=coef[3])
        mult = (1, 2, 4)[trial % 3]
        k = 2 + trial % 4
        seq = k * mult + int(torch.randint(0, 40, (1,), generator=gen))
        lengths = linear_fit_partition(seq, k, cost, multiple_of=mult)
        assert len(lengths) == k and sum(lengths) == seq, (cost, seq, k, mult, lengths)
        assert min(lengths) >= mult and all(s % mult == 0 for s in lengths[1:]), (cost, seq, k, mult, lengths)
        best = _best_max_cost(seq, k, cost, mult)
        assert max(_chunk_costs(cost, lengths)) <= best * (1 + 1e-9) + 1e-300, (cost, seq, k, mult, lengths)
    with pytest.raises(ValueError, match="a2"):
        linear_fit_partition(64, 2, LinearChunkCost(a1=1.0, a2=-1.0, b=0.0))


def test_time_chunks_runs_like_a_stage():
    cfg = BenchModel(model=GPTConfig(n_layers=2, dim=32, n_heads=2), seq_len=64)
    model = make_model(cfg)
    x, y = make_batch(cfg, 1)
    fwd, bwd = time_chunks(model, x, [32, 16, 16], loss_fn=cross_entropy_loss, target=y, repeats=1)
    assert len(fwd) == len(bwd) == 3 and min(fwd + bwd) > 0
    assert all(p.grad is not None for p in model.parameters())


def test_expected_peak_matches_the_formula():
    p, m, k, act = 4, 8, 4, 1000.0
    for r in range(p):
        ops = [(kind, r, u) for kind, u in compute_order(p, r, m, k)]
        got = expected_peak(ops, {r: (act, 0.0)}, [16] * k)
        assert got == pytest.approx(min(p - r + k - 1, m * k) / k * act)
        base = [(kind, r, u) for kind, u in compute_order(p, r, m, 1)]
        assert expected_peak(base, {r: (act, 0.0)}, [64]) == pytest.approx((p - r) * act)
    # Relayed K/V gradients add to the count while a micro-batch's backward is under way.
    ops = [(kind, 0, u) for kind, u in compute_order(p, 0, m, k)]
    assert expected_peak(ops, {0: (act, 400.0)}, [16] * k) > expected_peak(ops, {0: (act, 0.0)}, [16] * k)


FIXED_COST = LinearChunkCost(a1=1.39e-07, a2=2.65e-05, b=0.00797, a3=3.75e-08)


@pytest.fixture
def fixed_times(monkeypatch):
    """The bench commands time real chunks, but get fixed seconds back (FIXED_COST's).

    Measured times vary from run to run; a test in the default command must not depend
    on them, so the calibrated partition and every figure derived from times are fixed.
    """
    import pipelining_seq.tools.bench.gpu as gpu
    import pipelining_seq.tools.bench.partition as bench_partition

    def time_chunk(module, inputs, *, length, end, **kw):
        real_time_chunk(module, inputs, length=length, end=end, **{**kw, "repeats": 1})
        return FIXED_COST.predict(length, end)

    def time_chunks(module, inputs, lengths, **kw):
        real_time_chunks(module, inputs, lengths, **{**kw, "repeats": 1})
        ends = [sum(lengths[: j + 1]) for j in range(len(lengths))]
        costs = [FIXED_COST.predict(s, e) for s, e in zip(lengths, ends)]
        return [c / 3 for c in costs], [2 * c / 3 for c in costs]

    for mod in (gpu, bench_partition):
        monkeypatch.setattr(mod, "time_chunk", time_chunk)
        monkeypatch.setattr(mod, "time_chunks", time_chunks)


def test_bench_gpu_smoke(tmp_path, capsys, fixed_times):
    rc = cli_main(["bench", "gpu", "--smoke", "--budget-s", "1e9", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu.json").read_text())["report"]
    assert rc == 0, out
    sections = report["sections"]
    assert {n: s["status"] for n, s in sections.items()} == dict.fromkeys(
        ("parity", "documents", "weight_grad", "chunk_times", "stage_memory", "simulate"), "ok")
    parity = sections["parity"]["result"]
    assert parity and all(r["ok"] for r in parity)
    docs = sections["documents"]["result"]
    assert docs["parity"] and all(r["ok"] for r in docs["parity"])
    assert all(set(r["masked_tiles"]) == {"cpu"} for r in docs["parity"])  # "efficient" on CUDA
    assert {r["case"] for r in docs["timing"]} == {"causal", "documents"}
    wgrad = sections["weight_grad"]["result"]
    assert {r["dtype"] for r in wgrad["parity"]} == {"float32", "bfloat16"}
    assert all(r["ok"] and r["covered_params"] > 0 and r["i_w_vs_b"] < 1e-6 for r in wgrad["parity"])
    assert wgrad["timing"]["b_ms"] > 0 and wgrad["timing"]["w_ms"] > 0
    assert {r["backend"] for r in parity} >= {"blockwise", "sdpa"}
    assert {r["dtype"] for r in parity} == {"float32", "bfloat16"}
    mem = {r["schedule"]: r for r in sections["stage_memory"]["result"]}
    # p=4, k=4: ideal 7/16 of 1F1B's peak.
    assert 0.40 < mem["Seq1F1B uniform"]["vs_1F1B"] < 0.5
    assert mem["Seq1F1B uniform"]["peak_live_units"] == 7 and mem["1F1B"]["peak_live_units"] == 4
    parts = sections["chunk_times"]["result"]["partitions"]
    assert set(parts) == {"full", "uniform@4", "balanced@4", "calibrated@4"}
    assert "parity" in out and "stage_memory" in out
    calibrated = parts["calibrated@4"]["lengths"]
    assert calibrated == linear_fit_partition(256, 4, FIXED_COST, multiple_of=8)


def test_bench_partition_feeds_the_simulator(tmp_path, capsys, fixed_times):
    rc = cli_main(["bench", "partition", "--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "128",
                   "--chunks", "2", "--repeats", "1", "--warmup", "0", "--calib-repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "partition.json").read_text())
    assert {r["partition"] for r in data["rows"]} == {"full", "uniform", "balanced", "calibrated"}
    assert all(r["max_over_mean"] >= 1.0 for r in data["rows"])
    full = data["rows"][0]
    assert full["partition"] == "full" and full["total_over_full"] == 1.0
    assert all(r["total_over_full"] == pytest.approx(r["total_ms"] / full["total_ms"]) for r in data["rows"])
    calib = data["meta"]["calibration"]
    assert len(calib["samples"]) >= 4 and sum(calib["lengths"]["2"]) == 128
    capsys.readouterr()
    for part in ("uniform", "calibrated"):
        assert cli_main(["simulate", "--pp", "2", "-m", "2", "-k", "2", "--times",
                         str(tmp_path / "partition.json"), "--partition", part]) == 0
    assert "Seq1F1B" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_memory_four_ranks(tmp_path, capsys):
    rc = cli_main(["bench", "memory", "--layers", "8", "--dim", "32", "--heads", "2", "--seq-len", "64",
                   "--microbatches", "4", "--chunks", "4", "--partitions", "uniform",
                   "--schedules", "1F1B,ZBVZeroBubble", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "memory.json").read_text())
    rows = {(r["schedule"], r["k"]): r for r in data["rows"]}
    seq, base = rows[("Seq1F1B", 4)], rows[("1F1B", 1)]
    assert seq["rank0_vs_1F1B"] < 0.5  # ideal 7/16 plus a little relayed K/V gradient
    for row in (seq, base):
        for got, want in zip(row["peak_mib"], row["expected_mib"]):
            assert got == pytest.approx(want, rel=0.1)
    assert base["peak_mib"] == sorted(base["peak_mib"], reverse=True)  # p - r micro-batches on rank r


@pytest.mark.slow
def test_bench_time_two_ranks(tmp_path, capsys):
    rc = cli_main(["bench", "time", "--layers", "4", "--dim", "32", "--heads", "2", "--seq-len", "64",
                   "--microbatches", "2", "--chunks", "1,2", "--partition", "balanced", "--warmup", "1",
                   "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "time.json").read_text())
    assert all(r["error"] is None and len(r["times"]) == 1 for r in data["runs"])
    names = {r["schedule"] for r in data["runs"]}
    assert names == {"Seq1F1B", "1F1B", "GPipe", "Interleaved1F1B", "ZBVZeroBubble"}
    ratios = [r for r in data["rows"] if r["k"] == 2][0]
    assert all(ratios[f"{n}/Seq1F1B"] > 0 for n in ("1F1B", "GPipe", "Interleaved1F1B", "ZBVZeroBubble"))
    assert any(r.get("overhead") is not None for r in data["rows"])
    assert torch.distributed.is_available()
