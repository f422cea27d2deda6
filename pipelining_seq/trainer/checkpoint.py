"""Sharded checkpoints on ``torch.distributed.checkpoint`` (DCP), in safetensors.

Layout of ``checkpoint.folder``::

    step-000200/
        shard-00001-model-00001-of-00001.safetensors   one file per rank, written by that rank
        shard-00002-model-00001-of-00001.safetensors   through DCP's HuggingFaceStorageWriter:
        ...                                            model.<fqn>, optim.<fqn>.<state>, meta.step.rank<r>
        manifest.json                                  written last, by rank 0

Every rank writes only its own shard of the state (its pipeline stages, its FSDP2 / tensor
parallel slices; replicated tensors once), with the offsets DCP records in each file's
metadata, so a checkpoint loads on another ``data_parallel_shard_degree``,
``tensor_parallel_degree`` or pipeline layout (DCP reads the slices each rank needs), and bit
for bit on the same layout. Parameter names are those of the unsplit model, so
``pipelining-seq export`` gathers them into one file ``GPT.load_state_dict`` takes.

The manifest (step, config, per-rank RNG, optimizer hyper-parameters, size and sha256 of
every shard) is written after every shard is in place; a folder without it is an
interrupted save and is never loaded (``checkpoint.load=latest`` skips it). The step is
cross-checked between the folder name, the manifest and a ``meta.step.rank<r>`` tensor in
every shard, and a shard the manifest does not list is refused. A checkpoint is never
written from non-finite weights. With ``checkpoint.async_mode=async`` the shards are
written by a background thread from a CPU copy and the manifest follows when the write
finished (at the next save or the end of the run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from .. import _compat
from ..models.gpt import GPTConfig
from .config import JobConfig, to_dict
from .layout import chunk_lengths, pipeline_layout, resolve_path, schedule_info

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "NonFiniteStateError",
    "config_problems",
    "find_checkpoints",
    "abandon_pending",
    "finish_pending",
    "load_checkpoint",
    "read_manifest",
    "resolve_load",
    "save_checkpoint",
    "start_timeline",
]

logger = logging.getLogger(__name__)

FORMAT = "pipelining_seq.checkpoint.v2"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STEP_KEY = "meta.step.rank"
_MANIFEST_KEYS = ("format", "step", "model", "files", "config", "world_size", "rng")
# Model fields that do not change the weights: a checkpoint loads across them.
_RUNTIME_ONLY = ("attn_backend", "activation_checkpoint")
# Above this many bytes `validate` checks sizes only; the ranks always check every sha256.
VALIDATE_SHA256_BYTES = 2 << 30


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt or of another model)."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (full disk, permissions); earlier ones are intact."""


class NonFiniteStateError(RuntimeError):
    """A save was asked for while weights or optimizer state hold NaN/inf."""


def step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step:06d}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shards(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))


# --------------------------------------------------------------------------- reading
def read_manifest(path: str, *, verify: str = "size") -> dict[str, Any]:
    """The manifest of the checkpoint in ``path``; raises :class:`CheckpointError` if it is
    incomplete, malformed, of another step, or a shard is missing, extra or differs
    (``verify``: 'size' checks sizes and each shard's step; 'sha256' also the hashes)."""
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
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a JSON object")
    if manifest.get("format") == "pipelining_seq.checkpoint.v1":
        raise CheckpointError(
            f"checkpoint {path} is in the per-stage format of an earlier pipelining_seq (v1); this version reads "
            f"{FORMAT} (sharded, torch.distributed.checkpoint): load it with the earlier version and export it"
        )
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lacks {missing} (edited or truncated); use another step")
    step = manifest["step"]
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if not isinstance(step, int) or (m and int(m.group(1)) != step):
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST} says step {step!r} but the folder is step {int(m.group(1)) if m else '?'} "
            "(edited manifest or moved folder); use another step"
        )
    files = manifest["files"]
    ranks: set[int] = set()
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no shard files")
    extra = sorted(set(_shards(path)) - set(files))
    if extra:
        raise CheckpointError(f"checkpoint {path}: shard files {extra} are not in {MANIFEST} (copied in from elsewhere?)")
    for name, meta in files.items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path}: shard {name} is missing")
        if not isinstance(meta, dict) or "bytes" not in meta or "sha256" not in meta:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} entry of {name} lacks bytes/sha256")
        if os.path.getsize(fpath) != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {os.path.getsize(fpath)} bytes, manifest says {meta['bytes']}")
        if verify == "sha256" and _sha256(fpath) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 in the manifest (corrupt)")
        ranks.update(_check_shard_step(path, name, step))
    world = manifest["world_size"]
    lacking = sorted(set(range(world)) - ranks) if isinstance(world, int) else []
    if lacking:
        raise CheckpointError(
            f"checkpoint {path}: no shard of rank(s) {lacking} of the {world} that saved it (written on another "
            "node? checkpoint.folder must be storage shared by all nodes); use a complete checkpoint"
        )
    return manifest


def _check_shard_step(path: str, name: str, step: int) -> set[int]:
    """The ranks whose state the shard holds; raises unless all of it is of ``step``."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            steps = {k: int(f.get_tensor(k).item()) for k in f.keys() if k.startswith(_STEP_KEY)}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"checkpoint {path}: shard {name} is unreadable ({e})") from None
    other = {k: s for k, s in steps.items() if s != step}
    if not steps or other:
        raise CheckpointError(
            f"checkpoint {path}: shard {name} is of step {sorted(set(other.values())) or 'unknown'}, the manifest of "
            f"step {step} (a file from another checkpoint); use another step"
        )
    return {int(k[len(_STEP_KEY):]) for k in steps if k[len(_STEP_KEY):].isdigit()}


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
    want = GPTConfig(**to_dict(cfg)["model"]).__dict__
    try:
        have = GPTConfig(**saved).__dict__
    except (TypeError, ValueError) as e:
        return [f"unreadable model section ({e})"]
    return [f"model.{k}: checkpoint {have[k]!r}, recipe {want[k]!r}" for k in want if k not in _RUNTIME_ONLY and have[k] != want[k]]


def compatibility_problems(manifest: dict[str, Any], cfg: JobConfig, path: str) -> list[str]:
    """Why the checkpoint at ``path`` cannot be loaded into ``cfg`` (empty if it can).

    Any pipeline / FSDP2 / tensor-parallel layout loads (DCP reshards); the model must match."""
    diff = _model_diff(manifest["model"], cfg)
    return [f"checkpoint {path} holds another model ({'; '.join(diff)})"] if diff else []


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
                manifest = read_manifest(path)
                if sum(f["bytes"] for f in manifest["files"].values()) <= VALIDATE_SHA256_BYTES:
                    manifest = read_manifest(path, verify="sha256")
                problems += [f"checkpoint.load={ck.load!r}: {p}" for p in compatibility_problems(manifest, cfg, path)]
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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _any(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank."""
    if not dist.is_initialized():
        return flag
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _rng_state() -> dict[str, str | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    enc = lambda t: base64.b64encode(bytes(t.tolist())).decode() if t is not None else None  # noqa: E731
    return {"cpu": enc(torch.get_rng_state()), "cuda": enc(cuda)}


def _set_rng_state(state: dict[str, str | None]) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["cpu"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["cuda"]))


# ------------------------------------------------------------------------ state dicts
def _flat_state(parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]):
    """This rank's sharded state as one flat dict (DTensors where the stage is sharded),
    and the optimizer state dicts it came from (param groups, to load back into)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat: dict[str, Any] = {}
    osds = []
    for part, opt in zip(parts, optimizers):
        for k, v in get_model_state_dict(part).items():
            flat[f"model.{k}"] = v
        osd = get_optimizer_state_dict(part, opt)
        for fqn, state in osd["state"].items():
            for key, value in state.items():
                flat[f"optim.{fqn}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        osds.append(osd)
    return flat, osds


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _all_finite(flat: dict[str, Any]) -> bool:
    return all(bool(torch.isfinite(_local(v)).all()) for v in flat.values() if _local(v).is_floating_point())


# ----------------------------------------------------------------------------- saving
_PENDING: dict[str, Any] = {}


def save_checkpoint(
    *, cfg: JobConfig, step: int, stage_ids: Sequence[int], parts: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], writer: bool = True,
    timeline: dict[str, Any] | None = None,
) -> str:
    """Collective: every rank calls it and writes its own shard. Returns the step folder.

    ``writer`` is accepted for compatibility and ignored (every rank writes). A previous
    checkpoint of the same step is replaced (its manifest removed first, so it never looks
    complete while half-written). Raises :class:`NonFiniteStateError` on every rank, writing
    nothing, if some rank's weights or optimizer state are not finite.
    """
    finish_pending()  # one save in flight at a time; its manifest is due first
    folder = resolve_path(cfg, cfg.checkpoint.folder)
    path = step_dir(folder, step)
    flat, osds = _flat_state(parts, optimizers)
    if _any(not _all_finite(flat)):
        raise NonFiniteStateError(
            f"not saving the checkpoint of step {step}: weights or optimizer state hold NaN/inf "
            f"(the last finite checkpoint in {folder} is kept)"
        )
    flat[f"{_STEP_KEY}{_rank()}"] = torch.tensor([step], dtype=torch.int64)
    if _rank() == 0:
        if os.path.exists(path):
            if os.path.exists(os.path.join(path, MANIFEST)):
                os.remove(os.path.join(path, MANIFEST))
            shutil.rmtree(path)
        os.makedirs(path)
    _barrier()
    import torch.distributed.checkpoint as dcp

    t0 = time.perf_counter()
    storage = dcp.HuggingFaceStorageWriter(path, save_distributed=True)
    info = {
        "step": step, "path": path, "folder": folder, "cfg": cfg, "t0": t0, "timeline": timeline,
        "param_groups": [[{k: v for k, v in g.items() if k != "params"} for g in o["param_groups"]] for o in osds],
        "lr_scheduler": [s.state_dict() for s in schedulers], "rng": _rng_state(),
    }
    if cfg.checkpoint.async_mode == "async" and dist.is_initialized():
        _PENDING["future"] = dcp.async_save(flat, storage_writer=storage, process_group=_async_group())
        _PENDING["info"] = info
        logger.debug("checkpoint step %d: writing in the background", step)
        return path
    try:
        dcp.save(flat, storage_writer=storage)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's wraps every rank's OSError (a BaseException)
        raise CheckpointSaveError(_save_failure(e, step=step, path=path, folder=folder)) from e
    _finalize(info)
    return path


def _save_failure(e: BaseException, *, step: int, path: str, folder: str) -> str:
    text = f"{e} {getattr(e, 'failures', '')}"
    if "No space left" in text or "ENOSPC" in text or "Errno 28" in text:
        cause = "no space left on the device"
        hint = "free space, lower checkpoint.keep_latest_k or move job.dump_folder"
    elif "Permission denied" in text or "Errno 13" in text or "Read-only" in text:
        cause = "permission denied"
        hint = "make checkpoint.folder writable or move job.dump_folder"
    else:
        cause = text.strip().splitlines()[-1][:200] if text.strip() else type(e).__name__
        hint = "see the cause"
    return (
        f"saving the checkpoint of step {step} to {path} failed: {cause}; the incomplete folder has no manifest and "
        f"is never loaded, earlier checkpoints in {folder} are intact; {hint}"
    )


def _async_group():
    # A group of its own, so the background write's collectives never interleave with the
    # training's collectives on the default group.
    if "group" not in _PENDING:
        _PENDING["group"] = dist.new_group(backend="gloo")
    return _PENDING["group"]


def finish_pending() -> str | None:
    """Wait for an asynchronous save and write its manifest (collective when one is
    pending on some rank; every rank calls it at the same points). Returns its folder."""
    future = _PENDING.pop("future", None)
    if future is None:
        return None
    result = getattr(future, "upload_completion", future)
    info = _PENDING.pop("info")
    try:
        result.result()
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - see save_checkpoint
        raise CheckpointSaveError(_save_failure(e, step=info["step"], path=info["path"], folder=info["folder"])) from e
    _finalize(info)
    return info["path"]


def abandon_pending() -> int | None:
    """Drop an asynchronous save without its manifest (an error that not every rank saw:
    no collective is safe). Its folder stays incomplete, so ``latest`` skips it; returns its step."""
    future = _PENDING.pop("future", None)
    info = _PENDING.pop("info", None)
    if future is None or info is None:
        return None
    logger.warning("checkpoint step %d: the background save is abandoned without its manifest (an error on "
                   "another rank); %s is incomplete and never loaded", info["step"], info["path"])
    return info["step"]


def _host() -> str:
    import socket

    return socket.gethostname()


def _check_shared(path: str, names: list[str]) -> list[str]:
    """Every rank must see every rank's shard (collective). Shards are written where each
    rank runs; without storage shared by all nodes, some are missing elsewhere. Returns
    the union of the shard names."""
    seen = _all_gather({"rank": _rank(), "host": _host(), "names": names})
    union = sorted({n for g in seen for n in g["names"]})
    for g in seen:
        missing = sorted(set(union) - set(g["names"]))
        if missing:
            writers = sorted({h["host"] for h in seen if set(missing) & set(h["names"])})
            raise CheckpointSaveError(
                f"checkpoint {path}: rank {g['rank']} on node {g['host']} does not see {missing} (written on "
                f"{', '.join(writers)}): checkpoint.folder must be storage shared by all nodes; no manifest was "
                "written, so this step is never loaded"
            )
    return union


def _finalize(info: dict[str, Any]) -> None:
    """After every shard is written: check every rank sees every shard, hash them (spread
    over the ranks), then rank 0 writes the manifest and prunes."""
    path, step, cfg = info["path"], info["step"], info["cfg"]
    _barrier()
    names = _check_shared(path, _shards(path))
    mine = {n: {"bytes": os.path.getsize(os.path.join(path, n)), "sha256": _sha256(os.path.join(path, n))}
            for n in names[_rank()::_world()]}
    gathered = _all_gather({"rank": _rank(), "files": mine, "rng": info["rng"],
                            "param_groups": info["param_groups"], "lr_scheduler": info["lr_scheduler"]})
    if _rank() == 0:
        files = {k: v for g in gathered for k, v in g["files"].items()}
        t = cfg.training
        manifest = {
            "format": FORMAT,
            "step": step,
            "model": to_dict(cfg)["model"],
            "layout": pipeline_layout(cfg),
            "parallelism": {k: v for k, v in to_dict(cfg)["parallelism"].items()},
            "schedule": schedule_info(cfg).name,
            "partition": {"num_seq_chunks": cfg.seq1f1b.num_seq_chunks, "chunk_lengths": chunk_lengths(cfg)},
            "data": {
                "next_step": step + 1, "dataset": t.dataset, "fingerprint": _data_fingerprint(t.dataset),
                "seed": t.seed, "seq_len": t.seq_len,
                "global_batch_size": t.local_batch_size * cfg.parallelism.data_parallel_shard_degree,
                "order": "batch of step s: start offsets from torch.Generator().manual_seed(seed * 1000003 + s)",
            },
            "world_size": len(gathered),
            "rng": {str(g["rank"]): g["rng"] for g in gathered},
            "optimizer": {str(g["rank"]): {"param_groups": g["param_groups"], "lr_scheduler": g["lr_scheduler"]}
                          for g in gathered},
            "finite": True,
            "timeline": info.get("timeline") or {},
            "files": files,
            "config": to_dict(cfg),
            "torch_version": torch.__version__,
            "save_seconds": round(time.perf_counter() - info["t0"], 3),
        }
        _atomic_json(manifest, os.path.join(path, MANIFEST))
        _prune(info["folder"], cfg.checkpoint.keep_latest_k)
        logger.info("checkpoint step %d -> %s", step, path)
    _barrier()


def _data_fingerprint(dataset: str) -> str | None:
    from .data import fingerprint

    return fingerprint(dataset)


def _prune(folder: str, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints. Every checkpoint is finite (a save of
    non-finite state is refused), so the newest finite one is always among those kept."""
    if keep <= 0:
        return
    for _, old in find_checkpoints(folder)[:-keep]:
        os.remove(os.path.join(old, MANIFEST))  # incomplete first, then gone
        shutil.rmtree(old)


def start_timeline(cfg: JobConfig, *, resumed_from: int | None) -> dict[str, Any]:
    """Begin a timeline in ``checkpoint.folder`` (rank 0 only, before the first save).

    Checkpoints past the resume step (or all of them, on a fresh start) belong to an
    abandoned timeline: they are moved to ``abandoned-<time>/`` so that neither
    ``checkpoint.load=latest`` nor pruning confuses them with this run's; nothing is deleted.
    """
    folder = resolve_path(cfg, cfg.checkpoint.folder)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    later = [(s, p) for s, p in find_checkpoints(folder) if resumed_from is None or s > resumed_from]
    if later:
        dest = os.path.join(folder, f"abandoned-{stamp}-{os.getpid()}")
        os.makedirs(dest, exist_ok=True)
        for _, p in later:
            os.replace(p, os.path.join(dest, os.path.basename(p)))
        what = "a fresh start" if resumed_from is None else f"resuming from step {resumed_from}"
        logger.warning(
            "%s: checkpoints of steps %s belong to an earlier timeline; moved to %s (latest and pruning ignore them)",
            what, [s for s, _ in later], dest,
        )
    return {"started": stamp, "resumed_from": resumed_from}


# ---------------------------------------------------------------------------- loading
def load_checkpoint(
    path: str, *, cfg: JobConfig, stage_ids: Sequence[int], parts: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any],
) -> int:
    """Restore this rank's stages and optimizer state (resharded by DCP when the layout
    differs), the LR schedule at the checkpoint's step, and the RNG when the layout is the
    same; return the step. Every shard's sha256 is checked, spread over the ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    manifest = read_manifest(path)
    problems = compatibility_problems(manifest, cfg, path)
    if problems:
        raise CheckpointError("; ".join(problems))
    names = sorted(manifest["files"])
    bad = [n for n in names[_rank()::_world()] if _sha256(os.path.join(path, n)) != manifest["files"][n]["sha256"]]
    bad = sorted({n for b in _all_gather(bad) for n in b})
    if bad:
        raise CheckpointError(f"checkpoint {path}: {bad} do not match their sha256 in the manifest (corrupt); use another step")
    step = int(manifest["step"])
    flat, osds = _flat_state(parts, optimizers)
    try:
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(path))
    except CheckpointException as e:  # a BaseException: make it an error the trainer reports in one line
        raise CheckpointError(f"checkpoint {path}: loading failed ({str(e).splitlines()[0][:300]})") from e
    for i, (part, opt) in enumerate(zip(parts, optimizers)):
        prefix = "model."
        model_sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix) and _owned(k, part)}
        set_model_state_dict(part, model_sd)
        osd = osds[i]
        state = {fqn: {key: flat[f"optim.{fqn}.{key}"] for key in st} for fqn, st in osd["state"].items()}
        set_optimizer_state_dict(part, opt, {"state": state, "param_groups": osd["param_groups"]})
    for sched in schedulers:
        # Built from the *current* recipe and put at the step (the factor is a function of
        # the step): equal to loading its state when the recipe is unchanged, and a changed
        # lr / warm-up / decay applies from the resume step when it is not (see resume.py).
        _compat.set_lr_scheduler_step(sched, step)
    same_layout = manifest.get("world_size") == _world() and manifest.get("parallelism") == to_dict(cfg)["parallelism"]
    rng = manifest["rng"].get(str(_rank())) if same_layout else None
    if rng is not None:
        _set_rng_state(rng)
    return step


def _owned(key: str, part: nn.Module) -> bool:
    return key[len("model."):] in part.state_dict()



# ----------------------------------------------------------------------------- export
# One safetensors file of the whole model: see export.py (kept importable from here).
