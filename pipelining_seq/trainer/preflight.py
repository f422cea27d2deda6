"""Checks of a recipe that need the machine: the output folder, the resume, the new knobs.

Called by :func:`pipelining_seq.trainer.validation.validate_config`, so both
``pipelining-seq validate`` and ``run`` fail here, before any process starts, instead of at
the first checkpoint save (an unwritable or full output folder) or after the ranks
started (a resume that would silently change the run).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile

from .config import JobConfig

__all__ = ["checkpoint_bytes", "field_problems", "machine_problems"]

logger = logging.getLogger(__name__)

_ASYNC_MODES = ("disabled", "async")
_RESUME_CHANGES = ("refuse", "apply")
_MAX_TIMEOUT_S = 7 * 24 * 3600
# fp32 weights, gradients and AdamW's two moments.
_TRAIN_BYTES_PER_PARAM = 16


def field_problems(cfg: JobConfig, world_size: int | None = None) -> list[str]:
    """The fields of the guard, the liveness and the checkpoint knobs, one by one."""
    errors: list[str] = []
    c, ck, t = cfg.comm, cfg.checkpoint, cfg.training
    if (not isinstance(c.timeout_s, (int, float)) or isinstance(c.timeout_s, bool) or not math.isfinite(c.timeout_s)
            or not 0 < c.timeout_s <= _MAX_TIMEOUT_S):
        errors.append(
            f"comm.timeout_s={c.timeout_s} must be a number of seconds in (0, {_MAX_TIMEOUT_S}] (how long a peer may "
            "stay silent before the run stops)"
        )
    if ck.async_mode not in _ASYNC_MODES:
        errors.append(f"checkpoint.async_mode={ck.async_mode!r}: use one of {', '.join(_ASYNC_MODES)}")
    if ck.resume_changes not in _RESUME_CHANGES:
        errors.append(f"checkpoint.resume_changes={ck.resume_changes!r}: use one of {', '.join(_RESUME_CHANGES)}")
    if t.skip_nonfinite_steps < 0:
        errors.append(f"training.skip_nonfinite_steps={t.skip_nonfinite_steps} must be >= 0 (0 stops at the first)")
    if world_size is not None and world_size < 1:
        errors.append(f"{world_size} processes: --nproc-per-node must be at least 1")
    return errors


def checkpoint_bytes(cfg: JobConfig) -> int:
    """Bytes of one checkpoint: fp32 weights and AdamW's two moments, plus 1%."""
    import torch

    from ..models.gpt import GPT

    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(cfg.model).parameters())
    return int(n * 4 * 3 * 1.01)


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _cannot_create_in(folder: str) -> str | None:
    """Why no folder can be made in ``folder`` (pseudo file systems such as /proc, read-only
    mounts: ``os.access`` says yes to root there), else None; the probe is removed at once."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pipelining-seq-probe-", dir=folder))
    except OSError as e:
        return e.strerror or str(e)
    return None


def _params(cfg: JobConfig) -> int:
    import torch

    from ..models.gpt import GPT

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg.model).parameters())


def _memory_problems(cfg: JobConfig) -> list[str]:
    """A model whose training state cannot fit this machine (CPU: its RAM for all ranks;
    CUDA: one device for one rank's share), named by its size knobs."""
    import torch

    try:
        n = _params(cfg)
    except (RuntimeError, ValueError, TypeError) as e:
        return [f"model: cannot be built ({str(e).splitlines()[0][:200]}): check model.dim, model.n_layers, model.n_heads"]
    p = cfg.parallelism
    world = p.pipeline_parallel_degree * p.data_parallel_shard_degree * p.tensor_parallel_degree
    cuda = cfg.training.device == "cuda" or (cfg.training.device == "auto" and torch.cuda.is_available())
    if cfg.training.device == "auto" and not cuda:
        # A recipe for whatever machine runs it (the paper recipes: GPU clusters), validated
        # on one without a GPU: this machine's RAM says nothing about the target's.
        return []
    if cuda:
        have, need, where = torch.cuda.get_device_properties(0).total_memory, n * _TRAIN_BYTES_PER_PARAM / world, "a GPU"
    else:
        have, need, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), n * _TRAIN_BYTES_PER_PARAM, "RAM"
    if need <= have:
        return []
    m = cfg.model
    return [
        f"model (model.dim={m.dim}, model.n_layers={m.n_layers}, model.vocab_size={m.vocab_size}) has {n:.3g} "
        f"parameters: weights, gradients and AdamW state need about {need / 2**30:.1f} GiB"
        f"{' per rank' if cuda else ''}, more than this machine's {have / 2**30:.1f} GiB of {where}: lower model.dim "
        "or model.n_layers" + (", or raise the parallel degrees" if cuda else "")
    ]


def machine_problems(cfg: JobConfig) -> list[str]:
    """The output folder is a writable directory with room for the checkpoints, and a
    resume would not silently change the run."""
    from . import checkpoint, resume
    from .layout import resolve_path

    errors: list[str] = []
    dump = cfg.job.dump_folder
    base = _existing_ancestor(dump)
    if os.path.exists(dump) and not os.path.isdir(dump):
        errors.append(f"job.dump_folder={dump} is a file, not a folder: choose another job.dump_folder")
    elif not os.path.isdir(base):
        errors.append(f"job.dump_folder={dump}: {base} is a file, not a folder: choose another job.dump_folder")
    elif not os.access(base, os.W_OK | os.X_OK) or _cannot_create_in(base):
        why = _cannot_create_in(base) or "not writable"
        errors.append(f"job.dump_folder={dump}: cannot create folders in {base} ({why}): choose a job.dump_folder "
                      "you can write to")
    elif cfg.checkpoint.enable:
        # keep_latest_k + 1 exist while a save runs (pruning follows it); keep-all needs at least one.
        k = cfg.checkpoint.keep_latest_k
        need = checkpoint_bytes(cfg) * (k + 1 if k > 0 else 1)
        ck_base = _existing_ancestor(resolve_path(cfg, cfg.checkpoint.folder))
        if not os.access(ck_base, os.W_OK | os.X_OK):
            errors.append(f"checkpoint.folder: {ck_base} is not writable: choose another checkpoint.folder")
        else:
            free = shutil.disk_usage(ck_base).free
            if free < need:
                errors.append(
                    f"checkpoint.folder on {ck_base} has {free / 2**20:.1f} MiB free but the checkpoints need about "
                    f"{need / 2**20:.1f} MiB ({checkpoint_bytes(cfg) / 2**20:.1f} MiB each, checkpoint.keep_latest_k="
                    f"{cfg.checkpoint.keep_latest_k}): free space, lower keep_latest_k or move job.dump_folder"
                )
    errors += _memory_problems(cfg)
    if cfg.checkpoint.load is not None:
        try:
            path = checkpoint.resolve_load(cfg)
            if path is not None:
                errors += resume.problems(checkpoint.read_manifest(path), cfg)
        except checkpoint.CheckpointError:
            pass  # reported by the checkpoint checks
    return errors
