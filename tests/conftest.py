import os
import sys

import pytest
import torch.distributed as dist

# Spawned ranks import test workers from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p
)


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
    dist.destroy_process_group()
