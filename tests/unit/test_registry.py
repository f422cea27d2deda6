"""The schedule registry: one description per schedule, read by every tool, any capitalisation."""

import pytest

from pipelining_seq import registry
from pipelining_seq.cli import main as cli_main
from pipelining_seq.schedule_ir_multi import check_deadlock_free, check_stage_orders
from pipelining_seq.tools.simulate import build_schedule_ops


def test_table_lists_every_schedule(capsys):
    assert cli_main(["schedules"]) == 0
    table = capsys.readouterr().out
    for name in registry.SCHEDULE_NAMES:
        assert name in table


@pytest.mark.parametrize("name", ["Seq1F1B", "InterleavedSeq1F1B", "Seq1F1BZeroBubble"])
def test_own_orders_are_runnable_and_admissibility_is_one_rule(name):
    info = registry.resolve_schedule(name.upper())
    p, m, k = 4, 4, 2
    v = info.stages_per_rank(None)
    orders = info.orders(pp=p, n_microbatches=m, n_seq_chunks=k)
    assert all(isinstance(a, registry.Action) for ops in orders.values() for a in ops)
    check_stage_orders(orders, p * v, m, k)
    check_deadlock_free(orders, p * v)
    assert sorted(s for r in range(p) for s in info.rank_stages(pp=p, rank=r, stages_per_rank=v)) == list(range(p * v))
    with pytest.raises(ValueError, match="units cannot fill 4 pipeline ranks"):
        info.orders(pp=4, n_microbatches=1, n_seq_chunks=2)


def test_peak_live_units_one_rule():
    A = registry.Action
    assert registry.peak_live_units([A("F", 0, 0), A("F", 0, 1), A("B", 0, 1), A("B", 0, 0)]) == 2
    # A split backward frees the unit at W, not at I.
    assert registry.peak_live_units([A("F", 0, 0), A("I", 0, 0), A("F", 0, 1), A("W", 0, 0)]) == 2


@pytest.mark.parametrize("spelling", ["seq1f1bzerobubble", "SEQ1F1B", "interleavedseq1f1b"])
def test_simulate_takes_any_capitalisation(spelling, capsys):
    assert cli_main(["simulate", "--pp", "2", "-m", "2", "-k", "2", "--schedule", spelling]) == 0
    assert registry.resolve_schedule(spelling).name in capsys.readouterr().out
    assert build_schedule_ops(spelling, pp=2, microbatches=2, chunks=2).name == registry.resolve_schedule(spelling).name


def test_action_converts_to_torch():
    from pipelining_seq import _compat

    a = registry.Action("W", 3, 5).to_torch()
    assert (a.stage_index, a.computation_type, a.microbatch_index) == (3, _compat.BACKWARD_WEIGHT, 5)
