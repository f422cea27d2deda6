"""Launch the torchtitan entry point on CPU with every loss recorded at full precision (tests only).

Usage (one process per rank, under torchrun)::

    torchrun --nproc-per-node 2 tests/torchtitan_cpu.py <entry arguments>

The CPU setup is the package's own (``python -m pipelining_seq.integrations.torchtitan
--cpu``, :mod:`pipelining_seq.integrations.torchtitan.cpu`); this launcher only adds the
recording: torchtitan prints losses rounded to 5 decimals, so every logged training and
validation loss is also written to ``$TT_LOSS_LOG`` (JSON lines).
"""

from __future__ import annotations

import json
import os
import sys

from pipelining_seq.integrations.torchtitan import cpu
from pipelining_seq.integrations.torchtitan.__main__ import main as entry


def record_losses(log_path: str) -> None:
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
    args = sys.argv[1:]
    if "--cpu" in args:
        cpu.install()  # before torchtitan is imported below; the entry's own install is then a no-op
    if os.environ.get("TT_LOSS_LOG"):
        record_losses(os.environ["TT_LOSS_LOG"])
    entry(args)


if __name__ == "__main__":
    main()
