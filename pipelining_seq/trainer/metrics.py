"""What a run reports: model FLOPs, peak memory per stage, TensorBoard, profiler traces.

* :func:`model_flops_per_token` counts model FLOPs the way the Seq1F1B paper does
  (3 x forward, causal attention at half, recompute not counted), with
  :mod:`pipelining_seq.flops`.
* :class:`StageMemory` is the peak memory of one pipeline rank during a step: the CUDA
  allocator's high-water mark on GPU; on CPU, where no allocator keeps one, the live
  bytes of tensors saved for backward plus the Seq1F1B K/V cache
  (:class:`pipelining_seq.tools.memory.ActivationMemoryMeter`), i.e. exactly what the schedule
  keeps alive between forward and backward. Parameters, gradients and optimizer state
  are not in the CPU figure (they do not depend on the schedule).
* :class:`MetricLogger` prints the progress line and writes TensorBoard scalars, on the
  rank that holds the last stage (where the loss is).
* :func:`build_profiler` records ``torch.profiler`` traces per rank; ``ScheduleSeq1F1B``
  and torch's runtime schedules label every unit ``PP:<stage><F|B><unit>``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..models.gpt import GPTConfig, flop_model
from ..tools.memory import ActivationMemoryMeter

__all__ = [
    "MetricLogger",
    "StageMemory",
    "build_profiler",
    "device_peak_tflops",
    "model_flops_per_token",
]

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOPS (no sparsity) from the vendors' datasheets, keyed by a substring
# of torch.cuda.get_device_name(). Anything else needs metrics.peak_tflops_per_device.
_GPU_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}


def model_flops_per_token(cfg: GPTConfig, *, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward FLOPs of one token in a ``seq_len`` sequence.

    The one FLOP model (:class:`pipelining_seq.flops.FlopModel`, the same that balances
    chunks and drives the simulator): embedding and output head ``4·H·V``, per layer
    the projections (GQA-aware), the MLP (GELU or SwiGLU) and causal attention at
    ``seq_len/2`` keys on average.
    """
    return flop_model(cfg).training_flops_per_token(seq_len)


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """Peak TFLOPS of one device for MFU: the configured value, a known GPU's, or None."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                logger.info("MFU against %s's dense bf16 peak of %.0f TFLOPS", name, tflops)
                return tflops
        logger.warning("no peak TFLOPS known for %s: set metrics.peak_tflops_per_device for MFU", name)
    return None


class StageMemory:
    """Peak memory of this rank's stages during the steps it wraps (see the module docs)."""

    def __init__(self, *, device: torch.device, modules: Iterable[nn.Module], kv_caches: Iterable[Any] = ()) -> None:
        self.device = device
        modules = list(modules)
        caches = [c for c in kv_caches if c is not None]
        self._meter = None
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "cpu_activations"
            # One meter per rank: saved-tensor hooks are global, so stages of one rank share it.
            self._meter = ActivationMemoryMeter(modules=modules, kv_cache=caches[0] if len(caches) == 1 else None)

    @contextlib.contextmanager
    def measure(self, enabled: bool = True):
        if not enabled:
            yield
            return
        if self._meter is None:
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            return
        self._meter.reset_peak()
        with self._meter:
            yield

    def peak_bytes(self) -> int:
        if self._meter is None:
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(self._meter.peak_bytes)


def _fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = min(width, round(width * done / max(total, 1)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class MetricLogger:
    """Progress line and TensorBoard scalars on the reporting rank; a no-op elsewhere."""

    def __init__(self, *, enabled: bool, total_steps: int, tb_folder: str | None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self._t0 = time.perf_counter()
        if enabled and tb_folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tb_folder, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tb_folder)
            logger.info("TensorBoard scalars in %s (tensorboard --logdir %s)", tb_folder, tb_folder)

    def log(self, step: int, scalars: dict[str, float], memory: dict[str, int | None]) -> str:
        """Write one log point; returns the progress line (empty on non-reporting ranks)."""
        if not self.enabled:
            return ""
        if self.writer is not None:
            for key, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            for stage, nbytes in memory.items():
                self.writer.add_scalar(f"memory/peak_MiB_{stage}", nbytes / 2**20, step)
            self.writer.flush()
        elapsed = time.perf_counter() - self._t0
        mem = " ".join(f"{stage} {nbytes / 2**20:.1f}" for stage, nbytes in memory.items())
        mfu = scalars.get("throughput/mfu_pct")
        line = (
            f"{_bar(step, self.total_steps)} step {step}/{self.total_steps} | loss {scalars['loss/train']:.4f} | "
            f"lr {scalars['lr']:.2e} | gnorm {scalars['grad_norm']:.3f} | "
            f"{_fmt_count(scalars['throughput/tokens_per_s'])} tok/s | "
            f"{scalars['throughput/tflops_per_device']:.3f} TFLOPS/dev | "
            f"mfu {'-' if mfu is None else f'{mfu:.1f}%'} | peak MiB {mem} | {elapsed:.0f}s"
        )
        logger.info(line)
        return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_profiler(
    *, enabled: bool, folder: str, rank: int, start_step: int, profile_freq: int, warmup: int, active: int,
    record_shapes: bool = False, profile_memory: bool = False, device: torch.device,
) -> contextlib.AbstractContextManager:
    """A ``torch.profiler.profile`` that records ``active`` steps ending on every multiple of
    ``profile_freq`` and writes one chrome trace per rank and window to ``folder``
    (readable by TensorBoard's profiler plugin and by Perfetto). Call ``.step()`` after
    every training step; a disabled profiler is a null context whose ``step`` does nothing.
    """
    if not enabled:
        return _NullProfiler()
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    logger.info("profiling %d step(s) every %d steps into %s", active, profile_freq, folder)
    return profile(
        activities=activities,
        # Profiler step i is training step start_step + 1 + i; skipping up to the next
        # multiple of profile_freq makes every window end on one.
        schedule=schedule(
            wait=profile_freq - warmup - active, warmup=warmup, active=active, skip_first=-start_step % profile_freq
        ),
        on_trace_ready=tensorboard_trace_handler(folder, worker_name=f"rank{rank}"),
        record_shapes=record_shapes,
        profile_memory=profile_memory,
    )


class _NullProfiler(contextlib.AbstractContextManager):
    def __exit__(self, *exc) -> None:
        return None

    def step(self) -> None:
        pass
