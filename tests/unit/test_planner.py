"""The memory planner: its activation model against measured bytes, and its verdicts."""

from __future__ import annotations

import argparse
import glob
import os

import pytest
import torch

from pipelining_seq.models import GPT, GPTConfig
from pipelining_seq.models.gpt import balanced_partition_for
from pipelining_seq.tools.planner import (
    calibrate,
    format_plan,
    main,
    parse_bytes,
    plan_from_config,
    plan_memory,
    stage_param_counts,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 1 << 30
G30B = GPTConfig(vocab_size=50304, n_layers=64, dim=6144, n_heads=64, ffn_dim=4 * 6144, mlp="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("whole_model", [False, True])
def test_activation_model_matches_cpu_meter(dtype, whole_model):
    # One stage driven through its Seq1F1B (uneven chunks) and 1F1B action lists; the
    # meter counts every saved tensor and the K/V cache. GELU+MHA and SwiGLU+GQA.
    for cfg in (
        GPTConfig(vocab_size=96, n_layers=2, dim=64, n_heads=4, mlp="gelu"),
        GPTConfig(vocab_size=96, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, mlp="swiglu"),
    ):
        for lengths in ([40, 24, 16, 24], [104]):
            r = calibrate(model=cfg, n_layers=2, pp=3, stage=0, n_microbatches=3, chunk_lengths=lengths,
                          dtype=dtype, batch=2, whole_model=whole_model)
            assert r["measured_bytes"] > 0
            assert abs(r["ratio"] - 1) < 0.002, r


def test_param_counts_follow_the_sharding():
    cfg = GPTConfig(vocab_size=64, n_layers=4, dim=32, n_heads=4, mlp="gelu")
    full = sum(c["full"] for c in stage_param_counts(cfg, pp=2, tp=1, dp_shard=1))
    assert full == sum(p.numel() for p in GPT(cfg).parameters())
    one = stage_param_counts(cfg, pp=2, tp=1, dp_shard=1)
    two = stage_param_counts(cfg, pp=2, tp=2, dp_shard=2)
    norms = 2 * 2 * 32  # two RMSNorm weights per block, replicated over TP
    assert two[0]["local"] == (one[0]["full"] - norms) // 2 + norms
    assert two[1]["sharded"] * 2 == two[1]["local"]


def _plan(schedule, lengths, **over):
    kw = dict(model=G30B, pp=8, dp_shard=1, tp=8, sequence_parallel=True, schedule=schedule,
              n_microbatches=16, microbatch_size=1, chunk_lengths=lengths, gpu_memory_bytes=parse_bytes("80GB"))
    kw.update(over)
    return plan_memory(**kw)


def test_30b_64k_seq1f1b_fits_and_1f1b_does_not():
    balanced = balanced_partition_for(G30B, 65536, 4, multiple_of=64)
    seq = _plan("Seq1F1B", balanced)
    one = _plan("1F1B", [65536])
    assert seq.fits and not one.fits
    assert [s.peak_live_units for s in seq.stages] == [8 - r + 4 - 1 for r in range(8)]
    assert [s.peak_live_units for s in one.stages] == [8 - r for r in range(8)]
    # Stage 0 holds 11 units of ~1/4 micro-batch instead of 8 whole micro-batches.
    ratio = seq.stages[0].activation_bytes / one.stages[0].activation_bytes
    assert 0.3 < ratio < 0.45, ratio
    # 18 bytes per parameter at dp_shard=1 (bf16 copy, fp32 master, fp32 grads, AdamW).
    s0 = seq.stages[0]
    assert s0.param_bytes + s0.grad_bytes + s0.optimizer_bytes == 18 * s0.params
    # Without sequence parallelism (whole-chunk norms and projection inputs) Seq1F1B does not fit either.
    assert not _plan("Seq1F1B", balanced, sequence_parallel=False).fits


def test_flash_backend_keeps_more_kv_than_blockwise():
    lengths = [23424, 16640, 13632, 11840]
    block = _plan("Seq1F1B", lengths, attn_backend="blockwise")
    flash = _plan("Seq1F1B", lengths, attn_backend="flash")
    assert flash.stages[0].kv_bytes > block.stages[0].kv_bytes


@pytest.mark.parametrize(
    "over, needle",
    [
        (dict(tp=3), "n_heads=64 is not divisible by tensor_parallel_degree=3"),
        (dict(pp=128), "n_layers=64 cannot be split"),
        (dict(chunk_lengths=[65530, 6]), "not divisible"),
        (dict(schedule="Interleaved1F1B"), "the planner models schedules"),
        (dict(schedule="1F1B"), "runs whole sequences"),
    ],
)
def test_bad_plans_are_rejected(over, needle):
    kw = dict(schedule="Seq1F1B", lengths=[16384] * 4)
    kw.update(over)
    schedule, lengths = kw.pop("schedule"), kw.pop("lengths")
    lengths = kw.pop("chunk_lengths", lengths)
    with pytest.raises(ValueError, match=needle):
        _plan(schedule, lengths, **kw)


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * GiB == parse_bytes("80GiB")
    assert parse_bytes("512MB") == 512 << 20
    with pytest.raises(ValueError, match="80GB"):
        parse_bytes("lots")


def _args(recipe, *extra):
    return argparse.Namespace(recipe=recipe, overrides=list(extra), gpus=None, gpu_memory="80GB",
                              reserve="2GiB", json=False, calibrate=False)


@pytest.mark.parametrize("name, code, verdict", [("gpt30b_64k_seq1f1b", 0, "fits"),
                                                 ("gpt30b_64k_1f1b", 1, "does NOT fit")])
def test_plan_command_on_the_paper_recipe(capsys, name, code, verdict):
    assert main(_args(os.path.join(ROOT, "recipes", "paper", f"{name}.yaml"))) == code
    out = capsys.readouterr().out
    assert out.strip().endswith(verdict)
    assert "pp=8 x dp_shard=1 x tp=8 (sequence parallel) = 64 GPUs" in out


def test_plan_command_rejects_a_wrong_world_size(capsys):
    args = _args(os.path.join(ROOT, "recipes", "paper", "gpt30b_64k_seq1f1b.yaml"))
    args.gpus = 48
    assert main(args) == 2
    assert "48" in capsys.readouterr().out


PAPER = sorted(glob.glob(os.path.join(ROOT, "recipes", "paper", "*.yaml")))


def test_paper_recipes_come_in_twins():
    names = {os.path.basename(p) for p in PAPER}
    assert len(names) == 16  # 4 models x {32k, 64k} x {Seq1F1B, 1F1B}
    for n in names:
        twin = n.replace("_seq1f1b", "_1f1b") if "_seq1f1b" in n else n.replace("_1f1b", "_seq1f1b")
        assert twin in names


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_recipe_validates_and_plans(path):
    from pipelining_seq.trainer.config import load_config

    with open(path) as f:
        first = f.readline()
    assert first.startswith("# pipelining-seq run ") and first.rstrip().endswith(os.path.relpath(path, ROOT))
    cfg = load_config(path)
    plan = plan_from_config(cfg)  # runs validate_config with the recipe's own world size
    assert plan.gpus % 8 == 0 and plan.mixed_precision and not cfg.model.activation_checkpoint
    assert cfg.model.vocab_size == 50304 and cfg.model.ffn_dim == 4 * cfg.model.dim
    if cfg.parallelism.pipeline_parallel_schedule == "Seq1F1B":
        assert plan.fits, format_plan(plan)


def test_interleaved_plan_replays_its_own_order_over_both_stages_of_a_rank():
    from pipelining_seq import schedule_ir_multi

    model = GPTConfig(vocab_size=50304, n_layers=16, dim=2048, n_heads=16, mlp="gelu")
    common = dict(model=model, pp=4, dp_shard=1, tp=1, sequence_parallel=False, n_microbatches=8,
                  microbatch_size=1, chunk_lengths=[4096] * 4, gpu_memory_bytes=80 * GiB)
    inter = plan_memory(schedule="interleavedseq1f1b", stages_per_rank=2, **common)
    seq = plan_memory(schedule="Seq1F1B", **common)
    orders = schedule_ir_multi.interleaved_orders(4, 2, 8, 4)
    for r, sp in enumerate(inter.stages):
        assert [list(x) for x in sp.layers] == [list(range(2 * r, 2 * r + 2)), list(range(8 + 2 * r, 8 + 2 * r + 2))]
        assert sp.peak_live_units == schedule_ir_multi.peak_live_units_multi(orders[r])
        assert sp.params == seq.stages[r].params or r in (0, 3)  # embedding / head sit on other ranks
    assert sum(s.params for s in inter.stages) == sum(s.params for s in seq.stages)
    # Half the layers per unit, more units in flight: rank 0 ends a little below Seq1F1B (measured on 4 CPU
    # ranks by `bench memory --seq-schedules`: 0.98, docs/benchmarks-appendix.md §9.2).
    ratio = inter.stages[0].total_bytes / seq.stages[0].total_bytes
    assert 0.9 < ratio < 1.0, ratio
