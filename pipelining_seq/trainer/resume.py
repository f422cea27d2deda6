"""What a resume keeps from the checkpoint and what it takes from the recipe, made explicit.

A checkpoint restores the weights, the optimizer's moments and the step. Everything else
comes from the recipe: the learning-rate schedule is rebuilt from the recipe and put at the
checkpoint's step, AdamW's hyper-parameters are the recipe's. So a recipe that differs from
the checkpoint's on the optimizer, the LR schedule, the data (its order, its masking, or
the file's content: the manifest keeps a fingerprint of it) would silently change
the run's trajectory; :func:`trajectory_changes` lists those differences and
``checkpoint.resume_changes`` decides: ``refuse`` (default; the run stops before any
process starts, naming every field) or ``apply`` (the run continues with the recipe's
values from the resume step, and says so). Changes that do not alter the mathematics
(pipeline schedule, chunking, parallel degrees: DCP reshards) and a longer
``training.steps`` are reported only. A checkpoint at or past ``training.steps`` leaves
nothing to do.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .config import JobConfig, to_dict

__all__ = ["layout_changes", "nothing_to_do", "problems", "trajectory_changes"]

logger = logging.getLogger(__name__)

# Fields whose change alters the training trajectory from the resume step on.
_TRAJECTORY = (
    ("optimizer", None), ("lr_scheduler", None),
    ("training", "seed"), ("training", "dataset"), ("training", "dataset_dtype"), ("training", "seq_len"),
    ("training", "max_norm"), ("training", "document_masking"),
)
# Fields that change how the same mathematics is run.
_LAYOUT = (("parallelism", None), ("seq1f1b", None))


def _diff(saved: dict[str, Any], now: dict[str, Any], fields) -> list[str]:
    out = []
    for section, key in fields:
        a, b = saved.get(section, {}) or {}, now.get(section, {}) or {}
        keys = [key] if key else sorted(set(a) | set(b))
        for k in keys:
            if a.get(k) != b.get(k):
                out.append(f"{section}.{k}: checkpoint {a.get(k)!r}, recipe {b.get(k)!r}")
    return out


def _as_saved(cfg: JobConfig) -> dict[str, Any]:
    """The recipe as the manifest stores it (JSON: tuples become lists)."""
    return json.loads(json.dumps(to_dict(cfg)))


def _global_batch(d: dict[str, Any]) -> int | None:
    try:
        return d["training"]["local_batch_size"] * d["parallelism"]["data_parallel_shard_degree"]
    except (KeyError, TypeError):
        return None


def trajectory_changes(manifest: dict[str, Any], cfg: JobConfig) -> list[str]:
    """Recipe fields that differ from the checkpoint's and change the trajectory."""
    saved, now = manifest.get("config", {}) or {}, _as_saved(cfg)
    out = _diff(saved, now, _TRAJECTORY)
    data = manifest.get("data") or {}
    if data.get("fingerprint") and data.get("dataset") == cfg.training.dataset:
        from .data import fingerprint

        current = fingerprint(cfg.training.dataset)
        if current != data["fingerprint"]:
            out.append(f"training.dataset={cfg.training.dataset!r} content: checkpoint {data['fingerprint']}, "
                       f"file now {current} (replaced at the same path)")
    if _global_batch(saved) != _global_batch(now):
        out.append(f"global batch (training.local_batch_size * data_parallel_shard_degree): checkpoint "
                   f"{_global_batch(saved)}, recipe {_global_batch(now)}")
    return out


def layout_changes(manifest: dict[str, Any], cfg: JobConfig) -> list[str]:
    """Recipe fields that differ from the checkpoint's and change only how the step runs."""
    saved, now = manifest.get("config", {}) or {}, _as_saved(cfg)
    out = _diff(saved, now, _LAYOUT)
    a, b = (saved.get("training") or {}).get("steps"), cfg.training.steps
    if a != b:
        out.append(f"training.steps: checkpoint {a!r}, recipe {b!r} (the LR decay now ends at step {b})")
    return out


def problems(manifest: dict[str, Any], cfg: JobConfig) -> list[str]:
    """Errors for :func:`pipelining_seq.trainer.validation.validate_config`."""
    changes = trajectory_changes(manifest, cfg)
    if not changes or cfg.checkpoint.resume_changes == "apply":
        return []
    return [
        f"checkpoint.load resumes step {manifest['step']} with a recipe that differs from the checkpoint's on "
        f"{'; '.join(changes)}. A resume takes these from the recipe: set checkpoint.resume_changes=apply to train on "
        "with the recipe's values from that step, or restore the checkpoint's values"
    ]


def nothing_to_do(manifest: dict[str, Any], cfg: JobConfig, path: str) -> str | None:
    """The line to print when the checkpoint is at or past ``training.steps``."""
    step = manifest["step"]
    if step < cfg.training.steps:
        return None
    return (
        f"nothing to do: checkpoint {path} is at step {step} and training.steps={cfg.training.steps}; "
        "raise training.steps to train on"
    )


def report(manifest: dict[str, Any], cfg: JobConfig) -> None:
    """Log what the resume takes from the recipe (rank 0)."""
    applied = trajectory_changes(manifest, cfg)
    if applied:
        logger.warning("resume applies the recipe's %s from step %d (checkpoint.resume_changes=apply)",
                       "; ".join(applied), manifest["step"])
    layout = layout_changes(manifest, cfg)
    if layout:
        logger.info("resume on another layout or length: %s (the checkpoint is resharded)", "; ".join(layout))
