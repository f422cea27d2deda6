"""Save/load time and peak host memory of the trainer's checkpoint (DCP shards).

``python -m pipelining_seq.tools.checkpoint_bench`` runs 8 gloo ranks as pp2 x dp2 x tp2 on
CPU, builds the stages of a GPT (``--dim``, ``--layers``) with AdamW state, and times a
save and a load of the package's checkpoint (every rank writes its shard), checking that
the load restores every parameter exactly. Peak memory is the highest resident set size
above the rank's size before the operation, sampled every 5 ms, summed over ranks and the
worst rank. (The comparison with the earlier per-stage format, which read that format's
source from git history, is gone: a shipped tool does not run old source.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Highest RSS of this process above its level at the start of the ``with`` block."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _worker(rank: int, world: int, overrides: list[str], folder: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from ..parallel import build_mesh
    from ..trainer import checkpoint as ckpt
    from ..trainer.config import load_config
    from ..trainer.layout import stage_ranks
    from ..trainer.optim import build_optimizer
    from ..trainer.train import build_stage_module

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "gpt_tiny_cpu.yaml"
    cfg = load_config(str(recipe), [*overrides, f"job.dump_folder={folder}", "checkpoint.enable=true",
                                    f"checkpoint.folder={folder}/dcp"])
    par = cfg.parallelism
    mesh = build_mesh(pp=par.pipeline_parallel_degree, dp_shard=par.data_parallel_shard_degree,
                      tp=par.tensor_parallel_degree, device_type="cpu")
    pp_rank = mesh["pp"].get_local_rank()
    stage_ids = [s for s, r in enumerate(stage_ranks(cfg)) if r == pp_rank]

    def build():
        n = len(stage_ranks(cfg))
        parts = [build_stage_module(cfg, s, num_stages=n, device=torch.device("cpu"), mesh=mesh) for s in stage_ids]
        opts, scheds = zip(*(build_optimizer(cfg, p) for p in parts))
        return parts, list(opts), list(scheds)

    parts, opts, scheds = build()
    for part, opt in zip(parts, opts):  # AdamW state to save
        for p in part.parameters():
            p.grad = torch.ones_like(p) * 1e-3
        opt.step()
    dist.barrier()
    t0 = time.perf_counter()
    with _PeakRSS() as save_mem:
        path = ckpt.save_checkpoint(cfg=cfg, step=1, stage_ids=stage_ids, parts=parts, optimizers=opts,
                                    schedulers=scheds)
        dist.barrier()
    save_s = time.perf_counter() - t0
    fresh = build()
    dist.barrier()
    t0 = time.perf_counter()
    with _PeakRSS() as load_mem:
        ckpt.load_checkpoint(path, cfg=cfg, stage_ids=stage_ids, parts=fresh[0], optimizers=fresh[1],
                             schedulers=fresh[2])
        dist.barrier()
    load_s = time.perf_counter() - t0
    same = all(torch.equal(a.full_tensor() if hasattr(a, "full_tensor") else a,
                           b.full_tensor() if hasattr(b, "full_tensor") else b)
               for pa, pb in zip(parts, fresh[0]) for a, b in zip(pa.parameters(), pb.parameters()))
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix == ".safetensors")
    return {"save_s": save_s, "load_s": load_s, "save_extra": save_mem.extra, "load_extra": load_mem.extra,
            "bytes": size, "restored": same}


def main(argv: list[str] | None = None) -> int:
    from .testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    overrides = [
        f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=8",
        "parallelism.pipeline_parallel_degree=2", "parallelism.data_parallel_shard_degree=2",
        "parallelism.tensor_parallel_degree=2", "training.local_batch_size=4", "training.device=cpu",
    ]
    results = {}
    for fmt in ("dcp",):
        with tempfile.TemporaryDirectory() as folder:
            recs = run_ranks(_worker, 8, overrides, folder, timeout_s=1800)
        results[fmt] = {
            "save_s": max(r["save_s"] for r in recs), "load_s": max(r["load_s"] for r in recs),
            "save_peak_extra_MiB_sum": sum(r["save_extra"] for r in recs) / 2**20,
            "save_peak_extra_MiB_max": max(r["save_extra"] for r in recs) / 2**20,
            "load_peak_extra_MiB_sum": sum(r["load_extra"] for r in recs) / 2**20,
            "load_peak_extra_MiB_max": max(r["load_extra"] for r in recs) / 2**20,
            "files_MiB": recs[0]["bytes"] / 2**20, "restored_exactly": all(r["restored"] for r in recs),
        }
        print(fmt, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[fmt].items()}),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
