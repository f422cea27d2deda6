"""Launch a torchtitan entry point on CPU (gloo): test-only shims, never shipped.

Usage (one process per rank, under torchrun)::

    torchrun --nproc-per-node 2 tests/workers/torchtitan_cpu.py -m pipelining_seq.integrations.torchtitan <args>

torchtitan 0.3 assumes an accelerator: it takes ``_get_available_device_type() or "cuda"``
as its device, asks the device module for a name, memory figures and the current device
(``barrier(device_ids=[current_device()])``). The shims below make that device ``cpu``
before torchtitan is imported. They also record every logged training and validation
loss at full precision in ``$TT_LOSS_LOG`` (JSON lines), since torchtitan prints them
rounded to 5 decimals.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import types

import torch
import torch._utils


def _cpu_device_module() -> types.ModuleType:
    mod = types.ModuleType("cpu_device_shim")
    for name in dir(torch.cpu):
        if not name.startswith("__"):
            setattr(mod, name, getattr(torch.cpu, name))
    props = types.SimpleNamespace(name="cpu", total_memory=64 * 2**30)
    mod.get_device_name = lambda device=None: "cpu"
    mod.get_device_properties = lambda device=None: props
    mod.reset_peak_memory_stats = lambda device=None: None
    mod.empty_cache = lambda: None
    mod.memory_stats = lambda device=None: {
        "active_bytes.all.peak": 0, "reserved_bytes.all.peak": 0,
        "num_alloc_retries": 0, "num_ooms": 0,
    }
    mod.current_device = lambda: 0
    mod.set_device = lambda device=None: None
    mod.device_count = lambda: 1
    mod.is_available = lambda: True
    mod.synchronize = lambda device=None: None
    return mod


def install() -> None:
    cpu = _cpu_device_module()
    original = torch._utils._get_device_module
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda device_type="cuda": cpu if device_type == "cpu" else original(device_type)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")

    log_path = os.environ.get("TT_LOSS_LOG")
    if not log_path:
        return
    from torchtitan.components.metrics import MetricsProcessor

    def record(kind: str, step: int, loss: float) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "kind": kind, "step": step,
                                "loss": float(loss)}) + "\n")

    log, log_validation = MetricsProcessor.log, MetricsProcessor.log_validation

    def log_train(self, step, global_avg_loss, *args, **kwargs):
        record("train", step, global_avg_loss)
        return log(self, step, global_avg_loss, *args, **kwargs)

    def log_val(self, loss, step, *args, **kwargs):
        record("validation", step, loss)
        return log_validation(self, loss, step, *args, **kwargs)

    MetricsProcessor.log, MetricsProcessor.log_validation = log_train, log_val


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: torchtitan_cpu.py -m MODULE [args...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    install()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
