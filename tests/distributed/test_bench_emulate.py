"""bench emulate (sleeping compute, real schedules and gloo) and bench breakdown (per-rank
step time): shapes of their tables and JSON; no timing assertions."""

import json

import pytest

from pipelining_seq.cli import main as cli_main


@pytest.mark.slow
def test_bench_emulate_two_ranks(tmp_path, capsys):
    path = tmp_path / "emulate.json"
    rc = cli_main(["bench", "emulate", "--ranks", "2", "--microbatches", "2", "--chunks", "2",
                   "--schedules", "Seq1F1BZeroBubble,1F1B", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())
    assert [r["schedule"] for r in rows] == ["Seq1F1BZeroBubble", "1F1B"]
    for r in rows:
        assert {"schedule", "measured_s", "simulated_s"} <= set(r)
        assert r["measured_s"] > 0 and r["simulated_s"] > 0
        assert len(r["wait_s"]) == len(r["executor_s"]) == 2
    out = capsys.readouterr().out
    assert "measured_s" in out and "simulated_s" in out and "Seq1F1BZeroBubble" in out


def test_bench_emulate_refuses_bad_input():
    with pytest.raises(SystemExit, match="choose from"):
        cli_main(["bench", "emulate", "--ranks", "2", "--microbatches", "2", "--chunks", "2",
                  "--schedules", "Seq1F1B,NoSuchSchedule"])
    with pytest.raises(SystemExit, match="1F1B needs n_microbatches"):
        cli_main(["bench", "emulate", "--ranks", "4", "--microbatches", "2", "--chunks", "2",
                  "--schedules", "1F1B"])


@pytest.mark.slow
def test_bench_breakdown_two_ranks(tmp_path, capsys):
    rc = cli_main(["bench", "breakdown", "--layers", "4", "--dim", "32", "--heads", "2", "--seq-len", "64",
                   "--microbatches", "2", "--chunks", "2", "--partition", "uniform",
                   "--seq-schedules", "Seq1F1B,Seq1F1BZeroBubble", "--warmup", "1", "--repeats", "1",
                   "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "breakdown.json").read_text())["rows"]
    assert {(r["schedule"], r["rank"]) for r in rows} == {(s, r) for s in ("Seq1F1B", "Seq1F1BZeroBubble")
                                                          for r in (0, 1)}
    for r in rows:
        parts = r["F"] + r["B"] + r["I"] + r["W"] + r["wait"] + r["executor"]
        assert parts == pytest.approx(r["step"])
        assert r["F"] > 0
        assert r["n_wait"] > 0  # every schedule's p2p waits are timed (ours go through p2p.wait)
        if r["schedule"] == "Seq1F1B":
            assert r["B"] > 0 and r["I"] == r["W"] == 0
        else:
            assert r["I"] > 0 and r["W"] > 0 and r["B"] == 0
