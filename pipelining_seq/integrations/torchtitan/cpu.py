"""Run torchtitan 0.3 (and Seq1F1B inside it) on CPU gloo ranks: ``--cpu``.

torchtitan assumes an accelerator. ``python -m pipelining_seq.integrations.torchtitan --cpu
...`` calls :func:`install` before torchtitan is imported:

* the device: ``_get_available_device_type()`` answers ``cpu`` and its device module a
  ``torch.cpu``-like one with the name, memory figures and ``current_device()`` torchtitan
  asks for (``barrier(device_ids=[current_device()])``); torchtitan then picks gloo;
* offline: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``WANDB_MODE=disabled`` (unless set).

FSDP's gradient reduction on gloo (no ``ReduceOp.PREMUL_SUM``) is handled by
:func:`~pipelining_seq.integrations.torchtitan.enable` for every gloo run, ``--cpu`` or not.

:func:`make_assets` (``--cpu-assets DIR``) writes a small BPE tokenizer and a JSONL data
set from the package's own text, so a fresh machine needs no download, and
:func:`asset_args` gives the torchtitan flags that point at them. Flex attention has no
backward on CPU: a baseline schedule needs a model with SDPA attention, e.g. the configs
in :mod:`pipelining_seq.integrations.torchtitan.configs`, while the Seq1F1B schedules
replace the attention anyway.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import torch

from ... import _compat

__all__ = ["BOS", "EOS", "asset_args", "cpu_device_module", "install", "make_assets"]

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
_installed = False
_CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "python_reference.txt"


def cpu_device_module(total_memory: int = 64 * 2**30) -> types.ModuleType:
    """``torch.cpu`` plus what torchtitan asks of a device module (memory figures are zero)."""
    mod = types.ModuleType("pipelining_seq_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("__"):
            setattr(mod, name, getattr(torch.cpu, name))
    props = types.SimpleNamespace(name="cpu", total_memory=total_memory)
    mod.get_device_name = lambda device=None: "cpu"
    mod.get_device_properties = lambda device=None: props
    mod.reset_peak_memory_stats = lambda device=None: None
    mod.empty_cache = lambda: None
    mod.memory_stats = lambda device=None: {
        "active_bytes.all.peak": 0, "reserved_bytes.all.peak": 0, "num_alloc_retries": 0, "num_ooms": 0,
    }
    mod.current_device = lambda: 0
    mod.set_device = lambda device=None: None
    mod.device_count = lambda: 1
    mod.is_available = lambda: True
    mod.synchronize = lambda device=None: None
    return mod


def install() -> None:
    """Make torchtitan run on CPU; call before torchtitan is imported."""
    import sys

    global _installed
    if _installed:
        return
    if any(m == "torchtitan" or m.startswith("torchtitan.") for m in sys.modules):
        raise RuntimeError(
            "pipelining_seq.integrations.torchtitan.cpu.install() must run before torchtitan is imported: "
            "torchtitan picks its device when its modules load"
        )
    _compat.set_available_device("cpu", cpu_device_module())
    _installed = True
    for key, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "disabled")):
        os.environ.setdefault(key, value)


def make_assets(root: str | os.PathLike, *, n_docs: int = 400, vocab_size: int = 1024) -> tuple[Path, Path]:
    """(tokenizer folder, dataset folder) under ``root``, made once, offline.

    The tokenizer is a byte-level BPE trained (``tokenizers`` package) on ``n_docs``
    paragraphs of the package's corpus; the data set is the same paragraphs as JSONL
    ``{"text": ...}`` lines, torchtitan's ``c4_test`` format.
    """
    root = Path(root)
    tok_dir, data_dir = root / "tokenizer", root / "data"
    if (tok_dir / "tokenizer.json").exists() and (data_dir / "data.json").exists():
        return tok_dir, data_dir
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    paragraphs = [p.strip() for p in _CORPUS.read_text().split("\n\n") if len(p.strip()) > 40]
    docs = paragraphs[:n_docs]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", BOS, EOS], show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "data.json", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return tok_dir, data_dir


def asset_args(tok_dir: str | os.PathLike, data_dir: str | os.PathLike) -> list[str]:
    """torchtitan flags for the tokenizer and data of :func:`make_assets` (training and validation)."""
    return [
        "--hf_assets_path", str(tok_dir),
        "--dataloader.dataset", "c4_test", "--dataloader.dataset_path", str(data_dir),
        "--validator.dataloader.dataset", "c4_test", "--validator.dataloader.dataset_path", str(data_dir),
    ]
