"""One place for schedule names and stage placement; validate and plan agree on every recipe."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from pipelining_seq import registry
from pipelining_seq.cli import main as cli_main
from pipelining_seq.trainer import layout
from pipelining_seq.trainer.config import ConfigError, load_config

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "pipelining_seq", "recipes", "**", "*.yaml"),
                        recursive=True))


def _variants(name: str) -> list[str]:
    return sorted({name, name.lower(), name.upper(), name.swapcase()})


@pytest.mark.parametrize("name", registry.SCHEDULE_NAMES)
def test_every_spelling_resolves_to_one_schedule(name):
    for variant in _variants(name):
        assert registry.resolve_schedule(variant).name == name
    with pytest.raises(ValueError, match="Zigzag.*Seq1F1B"):
        registry.resolve_schedule("Zigzag")


def test_stage_placement_loop_and_v():
    loop, v = registry.resolve_schedule("interleaved1f1b"), registry.resolve_schedule("zbvzerobubble")
    assert registry.stage_ranks(loop, pp=3, stages_per_rank=2) == [0, 1, 2, 0, 1, 2]
    assert registry.stage_ranks(v, pp=3, stages_per_rank=2) == [0, 1, 2, 2, 1, 0]
    assert registry.rank_stages(v, pp=3, rank=0, stages_per_rank=2) == [0, 5]
    assert registry.rank_stages(loop, pp=2, rank=1, stages_per_rank=3) == [1, 3, 5]
    with pytest.raises(ValueError, match="exactly 2"):
        registry.stages_per_rank(v, 3)
    with pytest.raises(ValueError, match="exactly 1"):
        registry.stages_per_rank(registry.resolve_schedule("seq1f1b"), 2)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: os.path.relpath(p, os.path.dirname(p) + "/.."))
def test_validate_and_plan_agree_on_every_recipe_and_spelling(recipe, capsys, tmp_path):
    name = load_config(recipe).parallelism.pipeline_parallel_schedule
    for variant in _variants(name):
        override = [f"parallelism.pipeline_parallel_schedule={variant}", f"job.dump_folder={tmp_path}"]
        cfg = load_config(recipe, override)
        assert layout.schedule_info(cfg).name == registry.resolve_schedule(name).name
        assert cli_main(["validate", recipe, *override]) == 0, capsys.readouterr().err
        code = cli_main(["plan", recipe, *override])
        out = capsys.readouterr().out
        assert code in (0, 1) and "error" not in out, out  # 1: it does not fit; never "cannot plan"


def test_unknown_schedule_names_its_knob():
    with pytest.raises(ConfigError, match="pipeline_parallel_schedule.*Zigzag"):
        layout.schedule_info(load_config(None, ["parallelism.pipeline_parallel_schedule=Zigzag"]))


@pytest.mark.slow
def test_regular_install_lists_and_runs_recipes_from_an_empty_folder(tmp_path):
    """A non-editable ``pip install .`` into a fresh venv: recipes ship with the package."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The dependencies come from this environment (a path line in a .pth file: the editable
    # install's own .pth hooks there are not run, so only the copy installed below is
    # importable as pipelining_seq); the package itself is a regular, non-editable install.
    here = os.path.dirname(os.path.dirname(torch.__file__))
    venv_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(venv_site, "outer_deps.pth"), "w") as f:
        f.write(here + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", root], check=True,
                   cwd=tmp_path, timeout=900)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    site = subprocess.run([str(py), "-c", "import pipelining_seq, sys; print(pipelining_seq.__file__)"],
                          cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in site, f"imported {site} instead of the installed copy"
    ls = subprocess.run([str(venv / "bin" / "pipelining-seq"), "ls"], cwd=empty, env=env, capture_output=True,
                        text=True, timeout=120)
    assert ls.returncode == 0 and "gpt_tiny_cpu " in ls.stdout and "paper/gpt7b_32k_seq1f1b" in ls.stdout, ls
    run = subprocess.run(
        [str(venv / "bin" / "pipelining-seq"), "run", "--nproc-per-node", "2", "gpt_tiny_cpu", "training.steps=5",
         f"job.dump_folder={empty / 'out'}"], cwd=empty, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "step 5/5" in run.stdout + run.stderr


def _imports(path: str, package: str) -> set[str]:
    """Absolute names of the package modules ``path`` imports (relative imports resolved)."""
    import ast

    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("pipelining_seq"):
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipelining_seq")}
    return out


def test_core_imports_nothing_from_trainer_or_tools():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "pipelining_seq")
    offenders = []
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in ("trainer", "tools", "integrations"):
            continue
        for f in files:
            if not f.endswith(".py") or f == "cli.py":  # the CLI dispatches to trainer/tools by name, lazily
                continue
            package = "pipelining_seq" + ("" if rel == "." else "." + rel.replace(os.sep, "."))
            bad = [m for m in _imports(os.path.join(dirpath, f), package)
                   if m.startswith(("pipelining_seq.trainer", "pipelining_seq.tools"))]
            if bad:
                offenders.append((os.path.join(rel, f), sorted(bad)))
    assert not offenders, offenders
