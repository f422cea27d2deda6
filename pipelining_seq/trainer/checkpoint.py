"""Per-stage safetensors checkpoints with a JSON manifest written last.

Layout of ``checkpoint.folder``::

    step-000200/
        stage-00-of-02.safetensors   model.<fqn>, optim.<fqn>.<state> (+ param groups and
        stage-01-of-02.safetensors   LR-scheduler state as JSON in the file's metadata)
        manifest.json                step, config, stage layout, chunk partition, data
                                     position, per-rank RNG state, file sizes and sha256

Parameter names are those of the unsplit model, so ``pipelining-seq export`` merges the
stages into one file that ``GPT.load_state_dict`` takes. Every file is written to a
temporary name and renamed; the manifest is written by rank 0 only after every stage
file is in place, so a folder without ``manifest.json`` is an interrupted save and is
refused (``checkpoint.load=latest`` skips it). A checkpoint of another model or another
stage layout is refused with the fields that differ. With FSDP2 / tensor parallelism the
full (unsharded) stage tensors are saved, by the dp_shard=0, tp=0 rank of each stage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..models.gpt import GPT, GPTConfig
from .config import JobConfig, to_dict
from .layout import chunk_lengths, pipeline_layout, resolve_path, schedule_info

__all__ = [
    "CheckpointError",
    "config_problems",
    "export",
    "find_checkpoints",
    "load_checkpoint",
    "load_exported",
    "read_manifest",
    "resolve_load",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = "pipelining_seq.checkpoint.v1"
EXPORT_FORMAT = "pipelining_seq.model.v1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Model fields that do not change the weights: a checkpoint loads across them.
_RUNTIME_ONLY = ("attn_backend", "activation_checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt or of another model/layout)."""


def step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step:06d}")


def stage_file(stage: int, num_stages: int) -> str:
    return f"stage-{stage:02d}-of-{num_stages:02d}.safetensors"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: str, path: str) -> None:
    """Rename a finished temporary file into place, with the umask's permissions
    (safetensors creates files owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reading
def read_manifest(path: str, *, verify: str = "size") -> dict[str, Any]:
    """The manifest of the checkpoint in ``path``; raises :class:`CheckpointError` if it is
    incomplete or a stage file is missing or differs (``verify``: 'size' or 'sha256')."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {MANIFEST}: the save was interrupted); "
            "load an earlier step or checkpoint.load=latest, which skips incomplete ones"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, meta in manifest["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path}: stage file {name} is missing")
        if os.path.getsize(fpath) != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {os.path.getsize(fpath)} bytes, manifest says {meta['bytes']}")
        if verify == "sha256" and _sha256(fpath) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 in the manifest (corrupt)")
    return manifest


def find_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every step folder in ``folder`` that has a manifest, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(folder, name, MANIFEST)):
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def _model_diff(saved: dict[str, Any], cfg: JobConfig) -> list[str]:
    want = cfg.model.__dict__
    have = GPTConfig(**saved).__dict__
    return [f"model.{k}: checkpoint {have[k]!r}, recipe {want[k]!r}" for k in want if k not in _RUNTIME_ONLY and have[k] != want[k]]


def compatibility_problems(manifest: dict[str, Any], cfg: JobConfig, path: str) -> list[str]:
    """Why the checkpoint at ``path`` cannot be loaded into ``cfg`` (empty if it can)."""
    problems = []
    diff = _model_diff(manifest["model"], cfg)
    if diff:
        problems.append(f"checkpoint {path} holds another model ({'; '.join(diff)})")
    layout = pipeline_layout(cfg)
    if manifest["layout"] != layout:
        saved = manifest["layout"]
        diff = ", ".join(f"{k}: checkpoint {saved.get(k)}, recipe {layout[k]}" for k in layout if saved.get(k) != layout[k])
        problems.append(
            f"checkpoint {path} has another stage layout ({diff}): use the checkpoint's "
            "parallelism.pipeline_parallel_degree and schedule, or `pipelining-seq export` it to one file"
        )
    return problems


def config_problems(cfg: JobConfig) -> list[str]:
    """Checkpoint checks of :func:`pipelining_seq.trainer.validation.validate_config` (no processes)."""
    ck = cfg.checkpoint
    folder = resolve_path(cfg, ck.folder)
    problems: list[str] = []
    if ck.enable:
        for _, path in find_checkpoints(folder):
            try:
                manifest = read_manifest(path)
            except CheckpointError:
                continue
            diff = _model_diff(manifest["model"], cfg)
            if diff:
                problems.append(
                    f"checkpoint.folder={folder} already holds checkpoints of another model ({'; '.join(diff)}): "
                    "choose another checkpoint.folder or job.dump_folder"
                )
                break
    if ck.load is not None:
        try:
            path = resolve_load(cfg)
            if path is not None:
                problems += [f"checkpoint.load={ck.load!r}: {p}" for p in compatibility_problems(read_manifest(path), cfg, path)]
        except CheckpointError as e:
            problems.append(f"checkpoint.load={ck.load!r}: {e}")
    return problems


def resolve_load(cfg: JobConfig) -> str | None:
    """The checkpoint folder ``checkpoint.load`` points at, or None for a fresh start."""
    load = cfg.checkpoint.load
    if load is None or load == "":
        return None
    if load == "latest":
        found = find_checkpoints(resolve_path(cfg, cfg.checkpoint.folder))
        return found[-1][1] if found else None
    if os.path.isfile(os.path.join(load, MANIFEST)) or not find_checkpoints(load):
        read_manifest(load)  # raises with the reason when it is not a complete checkpoint
        return load
    return find_checkpoints(load)[-1][1]  # a checkpoint.folder: its newest checkpoint


# --------------------------------------------------------------------------- collectives
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rng_state() -> dict[str, str | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    enc = lambda t: base64.b64encode(bytes(t.tolist())).decode() if t is not None else None  # noqa: E731
    return {"cpu": enc(torch.get_rng_state()), "cuda": enc(cuda)}


def _set_rng_state(state: dict[str, str | None]) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["cpu"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["cuda"]))


# ----------------------------------------------------------------------------- saving
_FULL = StateDictOptions(full_state_dict=True)


def _stage_tensors(part: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in get_model_state_dict(part, options=_FULL).items()}
    osd = get_optimizer_state_dict(part, opt, options=_FULL)
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{fqn}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, osd["param_groups"]


def save_checkpoint(
    *, cfg: JobConfig, step: int, stage_ids: Sequence[int], parts: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], writer: bool = True,
) -> str:
    """Collective: every rank calls it; ``writer`` ranks write their stages' files.

    Returns the checkpoint folder. A previous checkpoint of the same step is replaced
    (its manifest is removed first, so it never looks complete while half-written).
    """
    folder = resolve_path(cfg, cfg.checkpoint.folder)
    path = step_dir(folder, step)
    layout = pipeline_layout(cfg)
    n = layout["num_stages"]
    if _rank() == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(path)
    _barrier()
    files: dict[str, dict[str, Any]] = {}
    for s, part, opt, sched in zip(stage_ids, parts, optimizers, schedulers):
        tensors, groups = _stage_tensors(part, opt)
        if not writer:
            continue
        name = stage_file(s, n)
        meta = {
            "format": FORMAT, "stage": str(s), "num_stages": str(n), "step": str(step),
            "param_groups": json.dumps(groups), "lr_scheduler": json.dumps(sched.state_dict()),
        }
        tmp = os.path.join(path, f".{name}.tmp-{os.getpid()}")
        save_file(tensors, tmp, metadata=meta)
        _publish(tmp, os.path.join(path, name))
        files[name] = {"stage": s, "bytes": os.path.getsize(os.path.join(path, name)), "sha256": _sha256(os.path.join(path, name))}
    gathered = _all_gather({"rank": _rank(), "files": files, "rng": _rng_state()})
    if _rank() == 0:
        all_files = {k: v for g in gathered for k, v in g["files"].items()}
        missing = [stage_file(s, n) for s in range(n) if stage_file(s, n) not in all_files]
        if missing:
            raise RuntimeError(f"checkpoint at step {step}: no rank wrote {missing}")
        t = cfg.training
        manifest = {
            "format": FORMAT,
            "step": step,
            "model": to_dict(cfg)["model"],
            "layout": layout,
            "schedule": schedule_info(cfg).name,
            "partition": {"num_seq_chunks": cfg.seq1f1b.num_seq_chunks, "chunk_lengths": chunk_lengths(cfg)},
            "data": {
                "next_step": step + 1, "dataset": t.dataset, "seed": t.seed, "seq_len": t.seq_len,
                "global_batch_size": t.local_batch_size * cfg.parallelism.data_parallel_shard_degree,
                "order": "batch of step s: start offsets from torch.Generator().manual_seed(seed * 1000003 + s)",
            },
            "world_size": len(gathered),
            "rng": {str(g["rank"]): g["rng"] for g in gathered},
            "files": all_files,
            "config": to_dict(cfg),
            "torch_version": torch.__version__,
        }
        _atomic_json(manifest, os.path.join(path, MANIFEST))
        _prune(folder, cfg.checkpoint.keep_latest_k)
        logger.info("checkpoint step %d -> %s", step, path)
    _barrier()
    return path


def _prune(folder: str, keep: int) -> None:
    if keep <= 0:
        return
    for _, old in find_checkpoints(folder)[:-keep]:
        os.remove(os.path.join(old, MANIFEST))  # incomplete first, then gone
        shutil.rmtree(old)


# ---------------------------------------------------------------------------- loading
def load_checkpoint(
    path: str, *, cfg: JobConfig, stage_ids: Sequence[int], parts: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any],
) -> int:
    """Restore this rank's stages, optimizers, LR schedulers and RNG; return the step."""
    manifest = read_manifest(path)
    problems = compatibility_problems(manifest, cfg, path)
    if problems:
        raise CheckpointError("; ".join(problems))
    n = manifest["layout"]["num_stages"]
    for s, part, opt, sched in zip(stage_ids, parts, optimizers, schedulers):
        fpath = os.path.join(path, stage_file(s, n))
        if _sha256(fpath) != manifest["files"][stage_file(s, n)]["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {stage_file(s, n)} does not match its sha256 (corrupt)")
        tensors = load_file(fpath)
        with safe_open(fpath, framework="pt") as f:
            meta = f.metadata()
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        set_model_state_dict(part, model_sd, options=StateDictOptions(full_state_dict=True, strict=True))
        groups = json.loads(meta["param_groups"])
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                fqn, name = key[len("optim."):].rsplit(".", 1)
                state.setdefault(fqn, {})[name] = value
        set_optimizer_state_dict(part, opt, {"state": state, "param_groups": groups}, options=_FULL)
        sched.load_state_dict(json.loads(meta["lr_scheduler"]))
    rng = manifest["rng"].get(str(_rank()))
    if rng is not None:
        _set_rng_state(rng)
    return int(manifest["step"])


# ----------------------------------------------------------------------------- export
def export(path: str, output: str) -> str:
    """Merge the stages of a checkpoint (a step folder, or a checkpoint folder for its
    newest) into one safetensors file of the full model; returns the step folder used."""
    if not os.path.isfile(os.path.join(path, MANIFEST)) and find_checkpoints(path):
        path = find_checkpoints(path)[-1][1]
    manifest = read_manifest(path, verify="sha256")
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(manifest["files"]):
        for key, value in load_file(os.path.join(path, name)).items():
            if key.startswith("model."):
                merged[key[len("model."):]] = value
    gpt_cfg = GPTConfig(**manifest["model"])
    with torch.device("meta"):
        expected = set(GPT(gpt_cfg).state_dict())
    if set(merged) != expected:
        raise CheckpointError(
            f"checkpoint {path}: stages do not cover the model (missing {sorted(expected - set(merged))[:5]}, "
            f"unexpected {sorted(set(merged) - expected)[:5]})"
        )
    meta = {"format": EXPORT_FORMAT, "model": json.dumps(manifest["model"]), "step": str(manifest["step"])}
    tmp = f"{output}.tmp-{os.getpid()}"
    save_file(merged, tmp, metadata=meta)
    _publish(tmp, output)
    return path


def load_exported(path: str, *, device: str | torch.device = "cpu") -> GPT:
    """A :class:`GPT` with the weights of an exported file (its config is in the metadata)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a pipelining_seq model export (format {meta.get('format')!r})")
    model = GPT(GPTConfig(**json.loads(meta["model"])))
    model.load_state_dict(load_file(path, device=str(device)))
    return model.to(device)


def add_arguments(parser, *, command: str) -> None:
    parser.description = "Merge the per-stage files of a checkpoint into one safetensors file of the full model."
    parser.add_argument("checkpoint", help="a step-NNNNNN folder, or a checkpoint folder (its newest complete step)")
    parser.add_argument("--output", "-o", required=True, help="the .safetensors file to write")


def main(args) -> int:
    try:
        used = export(args.checkpoint, args.output)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(used)
    print(
        f"exported step {manifest['step']} ({manifest['layout']['num_stages']} stages) of {used} to {args.output}; "
        "load with pipelining_seq.trainer.checkpoint.load_exported(path) or "
        "GPT(GPTConfig(**cfg)).load_state_dict(safetensors.torch.load_file(path))"
    )
    return 0
