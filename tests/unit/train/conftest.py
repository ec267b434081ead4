"""A one-process gloo group for the tests that build real DeepSpeed engines in the pytest process.

Session-scoped on purpose: DeepSpeed caches the world group it first sees, so a group destroyed and created
again in the same process ("Group ... is not registered") breaks every later engine."""
from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()
