"""Recipes, the schema, validation messages, data and FLOP counting (no processes)."""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess

import pytest
import torch

from pipelining_seq import cli
from pipelining_seq.models import GPTConfig
from pipelining_seq.partition import chunk_cost
from pipelining_seq.trainer.config import ConfigError, JobConfig, field_docs, load_config, to_markdown
from pipelining_seq.trainer.data import ByteTokenizer, TokenBatches, inspect_dataset, load_tokens, write_token_file
from pipelining_seq.trainer.metrics import model_flops_per_token
from pipelining_seq.trainer.validation import validate_config
from tests.workers.train_workers import DEFAULT_RECIPE, ROOT, tiny_config

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def test_recipes_exist_and_the_defaults_twin_is_there():
    names = {os.path.basename(r) for r in RECIPES}
    assert {"gpt_tiny_cpu.yaml", "gpt_tiny_cpu_1f1b.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_shipped_recipe_validates_and_starts_with_its_command(recipe):
    with open(recipe) as f:
        first = f.readline()
    assert first.startswith("# pipelining-seq run --nproc-per-node") and os.path.basename(recipe) in first
    cfg = load_config(recipe)
    p = cfg.parallelism
    nproc = int(first.split("--nproc-per-node")[1].split()[0])
    assert nproc == p.pipeline_parallel_degree * p.data_parallel_shard_degree * p.tensor_parallel_degree
    validate_config(cfg, world_size=nproc)


def test_seq1f1b_and_1f1b_twins_differ_only_in_schedule_and_outputs():
    a, b = load_config(DEFAULT_RECIPE), load_config(os.path.join(ROOT, "recipes", "gpt_tiny_cpu_1f1b.yaml"))
    for section in ("model", "training", "optimizer", "lr_scheduler", "metrics", "checkpoint"):
        assert getattr(a, section) == getattr(b, section), section
    assert (a.parallelism.pipeline_parallel_schedule, b.parallelism.pipeline_parallel_schedule) == ("Seq1F1B", "1F1B")


def test_every_field_has_a_docstring_and_recipes_md_is_up_to_date():
    for section in dataclasses.fields(JobConfig):
        cls = section.default_factory
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, (section.name, missing)
    with open(os.path.join(ROOT, "docs", "recipes.md")) as f:
        assert f.read() == to_markdown(), "regenerate: python -m pipelining_seq.trainer.config --markdown > docs/recipes.md"


def test_overrides_merge_and_types_convert():
    cfg = load_config(DEFAULT_RECIPE, ["training.steps=7", "seq1f1b.partition=[100,80,76]", "optimizer.betas=[0.8,0.9]"])
    assert cfg.training.steps == 7 and cfg.seq1f1b.partition == [100, 80, 76] and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.model == GPTConfig(vocab_size=256, n_layers=4, dim=128, n_heads=4, mlp="gelu")


# (overrides, --nproc-per-node or None, substrings the message must contain)
BAD = {
    "unknown key": (["training.stepz=5"], None, ["unknown key 'training.stepz'", "valid keys of training", "seq_len"]),
    "unknown section": (["trainer.steps=5"], None, ["unknown key 'trainer'", "parallelism"]),
    "wrong type": (["training.steps=abc"], None, ["training.steps", "abc"]),
    "stages do not divide layers": (["model.n_layers=5"], None, ["model.n_layers=5", "parallelism.pipeline_parallel_degree"]),
    "batch vs micro-batch": (["training.local_batch_size=7"], None, ["parallelism.pipeline_parallel_microbatch_size"]),
    "chunks do not divide": (["seq1f1b.num_seq_chunks=5"], None, ["seq1f1b.num_seq_chunks", "training.seq_len=256"]),
    "chunks do not fit": (["seq1f1b.num_seq_chunks=512", "seq1f1b.partition=balanced"], None, ["seq1f1b.num_seq_chunks"]),
    "partition not summing": (["seq1f1b.partition=[64,64,64,32]"], None, ["seq1f1b.partition", "sum"]),
    "missing data file": (["training.dataset=/nonexistent/tokens.bin"], None, ["training.dataset", "does not exist"]),
    "vocabulary too small": (["model.vocab_size=100"], None, ["model.vocab_size"]),
    "degrees vs world size": ([], 3, ["--nproc-per-node 2", "pipeline_parallel_degree"]),
    "unknown schedule": (["parallelism.pipeline_parallel_schedule=Zigzag"], None, ["pipeline_parallel_schedule", "1F1B"]),
    "1F1B too few micro-batches": (
        ["parallelism.pipeline_parallel_schedule=1F1B", "training.local_batch_size=2"], None,
        ["1F1B", "parallelism.pipeline_parallel_microbatch_size"],
    ),
    "heads vs tp": (["parallelism.tensor_parallel_degree=3"], None, ["model.n_heads=4", "tensor_parallel_degree=3"]),
    "sequence parallel chunks": (
        ["parallelism.tensor_parallel_degree=2", "parallelism.enable_sequence_parallel=true", "seq1f1b.partition=[65,63,64,64]"],
        None, ["tensor_parallel_degree=2", "seq1f1b.multiple_of"],
    ),
    "head dim": (["model.n_heads=3"], None, ["model.dim=128", "model.n_heads=3"]),
    "lr": (["optimizer.lr=0"], None, ["optimizer.lr"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=str)
def test_bad_config_fails_before_any_process_and_names_the_knob(case, monkeypatch, capsys, tmp_path):
    overrides, nproc, needles = BAD[case]

    def no_processes(*a, **k):
        raise AssertionError("a process was started for a bad recipe")

    monkeypatch.setattr(subprocess, "call", no_processes)
    monkeypatch.setattr(subprocess, "Popen", no_processes)
    argv = ["run", DEFAULT_RECIPE, *overrides, f"job.dump_folder={tmp_path}"] + (["--nproc-per-node", str(nproc)] if nproc else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


def test_checkpoint_folder_of_another_model_is_refused(tmp_path):
    from tests.distributed.test_checkpoint import _save, _stages

    cfg = tiny_config(str(tmp_path), "checkpoint.enable=true")
    _save(cfg, 2, _stages(cfg))
    validate_config(cfg)  # the same model may continue there
    with pytest.raises(ConfigError, match=r"checkpoint\.folder.*another model.*model\.n_layers"):
        validate_config(tiny_config(str(tmp_path), "checkpoint.enable=true", "model.n_layers=8"))


def test_validate_and_ls_commands(capsys):
    assert cli.main(["validate", "gpt_tiny_cpu", "seq1f1b.num_seq_chunks=8"]) == 0
    assert "k=8 chunks [32, 32, 32, 32, 32, 32, 32, 32]" in capsys.readouterr().out
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "gpt_tiny_cpu " in out and "gpt_tiny_cpu_1f1b" in out and "1F1B" in out
    assert cli.main(["run", "gpt_tiny_cpu", "--dry-run", "training.steps=3"]) == 0
    cmd = capsys.readouterr().out
    assert "torch.distributed.run --nproc-per-node=2 --standalone -m pipelining_seq.trainer.train" in cmd and "training.steps=3" in cmd


# ----------------------------------------------------------------------------- data
def test_builtin_corpus_is_a_few_hundred_kb_of_bytes():
    tokens = load_tokens("builtin")
    assert 200_000 < tokens.numel() < 1_000_000
    text = ByteTokenizer.decode(tokens[:2000])
    assert "Seq1F1B" in text or "Python" in text


def test_batches_depend_only_on_seed_and_step_and_dp_ranks_split_one_batch():
    tokens = load_tokens("builtin")
    a = TokenBatches(tokens, seq_len=32, global_batch_size=4, seed=3)
    b = TokenBatches(tokens, seq_len=32, global_batch_size=4, seed=3)
    b.batch(1), b.batch(2)  # another history
    assert all(torch.equal(u, v) for u, v in zip(a.batch(5), b.batch(5)))
    assert not torch.equal(a.batch(5)[0], a.batch(6)[0])
    x, y = a.batch(5)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    halves = [TokenBatches(tokens, seq_len=32, global_batch_size=4, seed=3, dp_rank=r, dp_degree=2).batch(5)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_files_round_trip_memory_mapped(tmp_path, dtype):
    ids = torch.tensor([0, 1, 255, 300, 65535, 7] * 50)
    path = str(tmp_path / "t.bin")
    write_token_file(ids, path, dtype=dtype)
    assert os.path.getsize(path) == ids.numel() * (2 if dtype == "uint16" else 4)
    back = load_tokens(path, dtype=dtype)
    assert torch.equal(back.to(torch.int64), ids)
    info = inspect_dataset(path, dtype=dtype)
    assert (info.n_tokens, info.max_token) == (300, 65535)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 6)  # three uint16 tokens: not a whole number of uint32
    with pytest.raises(ValueError, match="dataset_dtype"):
        inspect_dataset(str(odd), dtype="uint32")


def test_llmc_header_is_skipped(tmp_path):
    path = tmp_path / "llmc.bin"
    header = torch.zeros(256, dtype=torch.int32)
    header[0], header[1], header[2] = 20240520, 1, 5
    body = torch.tensor([5, 6, 7, 8, 9], dtype=torch.int32).to(torch.uint16)
    with open(path, "wb") as f:
        f.write(bytes(header.view(torch.uint8).tolist()) + bytes(body.view(torch.uint8).tolist()))
    assert load_tokens(str(path)).to(torch.int64).tolist() == [5, 6, 7, 8, 9]


def test_text_to_token_file_command(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("héllo")
    from pipelining_seq.trainer.data import main

    assert main([str(src), str(tmp_path / "a.bin")]) == 0
    assert ByteTokenizer.decode(load_tokens(str(tmp_path / "a.bin"))) == "héllo"


# ---------------------------------------------------------------------------- flops
def test_model_flops_match_the_papers_cost_model_and_count_gqa_swiglu():
    g = GPTConfig(vocab_size=256, n_layers=4, dim=128, n_heads=4, mlp="gelu")
    dims = dict(num_layers=4, hidden_size=128, num_heads=4, ffn_hidden_size=512, vocab_size=256)
    assert model_flops_per_token(g, seq_len=256) == pytest.approx(3 * chunk_cost(256, 256, **dims) / 256)
    # GQA + SwiGLU by hand: per layer q,o 2*2*H*H, k,v 2*2*H*H_kv, MLP 3 matmuls 2*H*F each.
    h, f, kv, s = 64, 176, 32, 128
    g2 = GPTConfig(vocab_size=100, n_layers=2, dim=h, n_heads=4, n_kv_heads=2, mlp="swiglu")
    assert g2.ffn_dim == f
    per_layer = 4 * h * h + 4 * h * kv + 6 * h * f + (4 * 16 + 3) * 4 * s / 2
    assert model_flops_per_token(g2, seq_len=s) == pytest.approx(3 * (4 * h * 100 + 2 * per_layer))
