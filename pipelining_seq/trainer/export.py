"""``pipelining-seq export``: the shards of a checkpoint gathered into one safetensors file.

DCP's reader (``HuggingFaceStorageReader``) reads every parameter's slices from the shards
of any layout into full tensors of the unsplit model, in one process without a process
group; the result is written under a temporary name and renamed (removed again if the
write fails). The file's metadata holds the model config and step, so :func:`load_exported`
(or ``GPT(GPTConfig(**cfg)).load_state_dict(safetensors.torch.load_file(path))``) takes it.
Refused before any shard is read: an output inside any checkpoint folder (the checkpoint
root, any step folder: it could replace a shard), an existing folder, a missing or
read-only folder; and a checkpoint with non-finite weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..models.gpt import GPT, GPTConfig
from .checkpoint import _STEP_DIR, MANIFEST, CheckpointError, find_checkpoints, read_manifest

__all__ = ["add_arguments", "export", "load_exported", "main"]

EXPORT_FORMAT = "pipelining_seq.model.v1"


def _inside_a_checkpoint(output: str, path: str) -> str | None:
    """The checkpoint folder ``output`` would land in (or replace a file of), else None.

    Refused: anywhere under the checkpoint root (the folder of step folders) of the
    exported checkpoint, under any step folder or any folder with a manifest, and any
    existing file that is one of the exported checkpoint's files (a hard link).
    """
    step_folder = os.path.realpath(path)
    root = os.path.dirname(step_folder) if _STEP_DIR.match(os.path.basename(step_folder)) else step_folder
    out = os.path.realpath(output)
    d = os.path.dirname(out)
    while True:
        if d in (root, step_folder) or _STEP_DIR.match(os.path.basename(d)) or os.path.isfile(os.path.join(d, MANIFEST)):
            return d
        up = os.path.dirname(d)
        if up == d:
            break
        d = up
    if os.path.isfile(out) and any(os.path.samefile(out, os.path.join(path, n)) for n in os.listdir(path)):
        return path
    return None


def _check_output(output: str) -> None:
    """Refuse an output that cannot be written, before any shard is read."""
    if os.path.isdir(output):
        raise CheckpointError(f"--output {output} is a folder: give the path of a .safetensors file to write")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise CheckpointError(f"--output {output}: the folder {parent} does not exist: create it or write elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--output {output}: the folder {parent} is not writable: write elsewhere")


def _find_step(path: str) -> str:
    """The step folder to export: ``path`` itself, or the newest complete one in it."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    found = find_checkpoints(path)
    if found:
        return found[-1][1]
    steps = [n for n in os.listdir(path) if _STEP_DIR.match(n)]
    if steps:
        raise CheckpointError(
            f"{path} holds no complete checkpoint ({sorted(steps)} have no {MANIFEST}: interrupted saves)"
        )
    if _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        read_manifest(path)  # an interrupted save: says so
    raise CheckpointError(
        f"{path} is no checkpoint (no {MANIFEST}, no step-NNNNNN folders): give a step folder or a checkpoint.folder"
    )


def export(path: str, output: str) -> str:
    """Gather the shards of a checkpoint (a step folder, or a checkpoint folder for its
    newest) into one safetensors file of the full model; returns the step folder used."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    path = _find_step(path)
    inside = _inside_a_checkpoint(output, path)
    if inside is not None:
        raise CheckpointError(
            f"--output {output} is inside the checkpoint folder {inside} (exporting {path}): it could replace a "
            "checkpoint's file; write the export elsewhere"
        )
    _check_output(output)
    manifest = read_manifest(path, verify="sha256")
    gpt_cfg = GPTConfig(**manifest["model"])
    with torch.device("meta"):
        shapes = GPT(gpt_cfg).state_dict()
    merged = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in shapes.items()}
    flat = {f"model.{k}": v for k, v in merged.items()}
    try:
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(path), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps reader errors in CheckpointException
        raise CheckpointError(f"checkpoint {path}: shards do not cover the model ({str(e).splitlines()[0][:300]})") from None
    if not all(math.isfinite(float(v.abs().max())) for v in merged.values() if v.numel()):
        raise CheckpointError(f"checkpoint {path} holds non-finite weights: export an earlier step")
    meta = {"format": EXPORT_FORMAT, "model": json.dumps(manifest["model"]), "step": str(manifest["step"])}
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        save_file(merged, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files owner-only
        os.replace(tmp, output)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise CheckpointError(f"--output {output}: writing failed ({str(e).splitlines()[0][:200]}); nothing was written") from None
    return path


def load_exported(path: str, *, device: str | torch.device = "cpu") -> GPT:
    """A :class:`GPT` with the weights of an exported file (its config is in the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file


    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a pipelining_seq model export (format {meta.get('format')!r})")
    model = GPT(GPTConfig(**json.loads(meta["model"])))
    model.load_state_dict(load_file(path, device=str(device)))
    return model.to(device)


def add_arguments(parser, *, command: str) -> None:
    parser.description = "Gather the shards of a checkpoint into one safetensors file of the full model."
    parser.add_argument("checkpoint", help="a step-NNNNNN folder, or a checkpoint folder (its newest complete step)")
    parser.add_argument("--output", "-o", required=True, help="the .safetensors file to write (not inside the checkpoint)")


def main(args) -> int:

    try:
        used = export(args.checkpoint, args.output)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(used)
    print(
        f"exported step {manifest['step']} ({len(manifest['files'])} shards) of {used} to {args.output}; "
        "load with pipelining_seq.trainer.checkpoint.load_exported(path) or "
        "GPT(GPTConfig(**cfg)).load_state_dict(safetensors.torch.load_file(path))"
    )
    return 0

