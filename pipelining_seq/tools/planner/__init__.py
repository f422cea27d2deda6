"""``pipelining-seq plan``: predict each pipeline stage's peak memory, without a GPU.

``pipelining-seq plan recipes/paper/gpt30b_64k_seq1f1b.yaml [--gpus 64 --gpu-memory 80GB]``
prints, per stage, parameter / gradient / optimizer bytes after TP and FSDP sharding,
activation bytes per unit, the peak number of live units under the recipe's schedule,
the K/V-cache bytes and the predicted peak, with a verdict. ``--calibrate`` measures a
stage on this machine (CPU or CUDA) against the prediction. See docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from .activations import ActivationModel
from .calibrate import CALIBRATION_SIZES, calibrate, run_calibration
from .plan import (
    GiB,
    MemoryPlan,
    StagePlan,
    format_plan,
    parse_bytes,
    plan_from_config,
    plan_memory,
    plan_to_dict,
    stage_param_counts,
)

__all__ = [
    "ActivationModel",
    "MemoryPlan",
    "StagePlan",
    "add_arguments",
    "calibrate",
    "format_plan",
    "main",
    "parse_bytes",
    "plan_from_config",
    "plan_memory",
    "plan_to_dict",
    "run_calibration",
    "stage_param_counts",
]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, *, command: str) -> None:
    parser.description = "Predict per-stage peak memory of a recipe on the meta device (no GPU needed)."
    parser.add_argument("recipe", nargs="?", help="recipe YAML (see `pipelining-seq ls`)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    parser.add_argument("--gpus", type=int, default=None, help="world size; default pp * dp_shard * tp")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB = 80 GiB, A100 80GB)")
    parser.add_argument("--reserve", default="2GiB", help="CUDA context, NCCL buffers, fragmentation (default 2GiB)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--calibrate", action="store_true",
        help="instead of planning, run one stage here and compare measured with predicted activation memory",
    )
    parser.add_argument("--device", default="cpu", help="--calibrate: cpu or cuda")
    parser.add_argument("--dtype", default=None, help="--calibrate: float32 or bfloat16 (default: bf16 on cuda)")
    parser.add_argument(
        "--size", default=None,
        help="--calibrate: dim,heads,seq_len,layers (default 4096,32,16384,2 on cuda; 128,4,512,2 on cpu)",
    )


def _calibrate_main(args: argparse.Namespace) -> int:
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    size = tuple(int(v) for v in args.size.split(",")) if args.size else CALIBRATION_SIZES.get(device)
    if size is None or len(size) != 4:
        print("error: --size needs dim,heads,seq_len,layers")
        return 2
    dim, heads, seq_len, layers = size
    rows = run_calibration(device=device, dtype=dtype, dim=dim, heads=heads, seq_len=seq_len, layers=layers)
    print(f"calibration on {device} ({dtype}), dim={dim} heads={heads} seq_len={seq_len} layers={layers}, "
          "stage 0 of p=4, m=4")
    print(f"{'case':<22} {'chunks':<28} {'live':>4} {'measured GiB':>12} {'predicted GiB':>13} {'pred/meas':>9}")
    for r in rows:
        print(f"{r['case']:<22} {str(r['chunk_lengths']):<28} {r['live_units']:>4} "
              f"{r['measured_bytes'] / GiB:>12.3f} {r['predicted_bytes'] / GiB:>13.3f} {r['ratio']:>9.3f}")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def main(args: argparse.Namespace) -> int:
    if args.calibrate:
        return _calibrate_main(args)
    from ...trainer.config import ConfigError, load_config
    from ...trainer.launch import find_recipe

    if not args.recipe:
        print("error: give a recipe (or --calibrate)")
        return 2
    try:
        cfg = load_config(find_recipe(args.recipe), list(args.overrides) + list(getattr(args, "extra", []) or []))
        plan = plan_from_config(cfg, gpus=args.gpus, gpu_memory=args.gpu_memory, reserve=args.reserve)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(json.dumps(plan_to_dict(plan), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1
