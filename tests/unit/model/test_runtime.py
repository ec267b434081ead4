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


def page_faults(*runs: tuple[str, dict[str, str]]) -> list[int]:
    """The churn's fault count after each (setup, env), in fresh processes run side by side (each counts its own)."""
    procs = [subprocess.Popen([sys.executable, "-c", CHURN.format(setup=setup)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})
             for setup, env in runs]
    counts = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
            counts.append(int(out.split()[-1]))
    finally:
        for proc in procs:
            proc.kill()  # those still running when one failed (no-op for the finished)
            proc.wait()
    return counts


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_cpu_embedding_call_makes_later_batches_reuse_freed_memory():
    default, embedded, user_setting = page_faults(("", {}), (EMBED_ONCE, {}),
                                                  (EMBED_ONCE, {"MALLOC_TRIM_THRESHOLD_": "134217728"}))
    assert default > 10_000  # the churn faults its blocks in again by default (46k-110k faults here)
    # after one embedding call: reused (0 here, most runs); a clean clone on 2026-12-02 counted 7,680 (30 MiB:
    # one of the churn's 30-MB blocks placed past the first round's heap top), so a block or two may fault again
    assert embedded <= 2 * 7680 and embedded < default / 3
    assert user_setting > default / 4  # the user's own malloc settings are left alone
