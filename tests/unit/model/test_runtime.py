"""clap_core.runtime.keep_freed_memory: batches reuse freed memory instead of faulting it in again."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# Allocates and frees 6 blocks of 8-30 MB, 18 times over (an embedding batch's activations), twice; prints the
# minor page faults of the second round. `setup` runs first. Transparent huge pages are off for the process
# (prctl PR_SET_THP_DISABLE): where the machine sets them to "always" (CI's, judging by its 7,680 default faults),
# one fault can map 2 MB instead of 4 KB and the count no longer measures bytes.
CHURN = """
import ctypes, resource, sys
assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE, before any large allocation
import torch
{setup}
def churn():
    for size_mb in (24, 8, 16, 30, 12, 20) * 3:
        block = [torch.ones(size_mb << 18) for _ in range(6)]
        del block
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

EMBED_ONCE = """
import numpy as np
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
ClapModel(get_model_config("tiny")).embed_audio([np.zeros(48_000, np.float32)], sample_rate=48_000)
"""


def page_faults(setup: str, **env: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHURN.format(setup=setup)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_cpu_embedding_call_makes_later_batches_reuse_freed_memory():
    default = page_faults("")
    assert default > 10_000  # the churn faults its blocks in again by default (46k-110k faults here)
    assert page_faults(EMBED_ONCE) < default / 20  # after one embedding call: reused (0 here)
    # the user's own malloc settings are left alone
    assert page_faults(EMBED_ONCE, MALLOC_TRIM_THRESHOLD_="134217728") > default / 4
