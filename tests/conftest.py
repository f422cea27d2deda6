import os

import pytest
import torch.distributed as dist

from pipelining_seq import p2p

# Workers are imported as ``tests.workers.<module>``: pytest puts the repository root on
# sys.path (``pythonpath`` in pyproject.toml) and torch.multiprocessing's spawned ranks inherit
# it; children started by torchrun or a subprocess find it through PYTHONPATH.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def world_of_one():
    """A one-rank gloo process group in the test process (for stages, FSDP, schedules)."""
    if dist.is_initialized():
        yield
        return
    from pipelining_seq.tools.testing import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    p2p.destroy_process_group()
