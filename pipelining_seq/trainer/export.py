"""``pipelining-seq export``: the shards of a checkpoint gathered into one safetensors file.

DCP's reader (``HuggingFaceStorageReader``) reads every parameter's slices from the shards
of any layout into full tensors of the unsplit model, in one process without a process
group; the result is written under a temporary name and renamed. The file's metadata holds
the model config and step, so :func:`load_exported` (or ``GPT(GPTConfig(**cfg))
.load_state_dict(safetensors.torch.load_file(path))``) takes it. An output inside the
checkpoint being exported is refused (it would replace one of its shards), and so is a
checkpoint with non-finite weights.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..models.gpt import GPT, GPTConfig
from .checkpoint import MANIFEST, CheckpointError, find_checkpoints, read_manifest

__all__ = ["add_arguments", "export", "load_exported", "main"]

EXPORT_FORMAT = "pipelining_seq.model.v1"


def _same_file_or_inside(output: str, path: str) -> bool:
    out = os.path.realpath(output)
    return os.path.dirname(out) == os.path.realpath(path) or (
        os.path.exists(out) and any(os.path.samefile(out, os.path.join(path, n)) for n in os.listdir(path))
    )


def export(path: str, output: str) -> str:
    """Gather the shards of a checkpoint (a step folder, or a checkpoint folder for its
    newest) into one safetensors file of the full model; returns the step folder used."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file


    if not os.path.isfile(os.path.join(path, MANIFEST)) and find_checkpoints(path):
        path = find_checkpoints(path)[-1][1]
    manifest = read_manifest(path, verify="sha256")
    if _same_file_or_inside(output, path):
        raise CheckpointError(
            f"--output {output} is inside the checkpoint being exported ({path}): write the export elsewhere"
        )
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
    save_file(merged, tmp, metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files owner-only
    os.replace(tmp, output)
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

