"""Ray Train's controller unpickles `clap pretrain`'s function per worker, and so imports the module it lives in:
that module must not bring torch, the model classes or DeepSpeed (about 9 s of CPU per controller on a 2-core
machine before it asked for any worker). The workers import pipelines.pretrain_worker when the function runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "deepspeed", "clap_core.model.clap", "pipelines.pretrain_worker")


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_controller_side_imports_none_of_the_workers_modules():
    # what the controller does with the trainer's function: unpickle it (by reference: pipelines.pretrain)
    loaded = modules_after(
        "import ray.cloudpickle as cp, pickle\n"
        "import pipelines.pretrain as p\n"
        "blob = cp.dumps((p.train_fn_per_worker, p.fail_fast_policy))\n"
        "assert b'pipelines.pretrain' in blob\n"
        "import sys; [sys.modules.pop(m) for m in list(sys.modules) if m.startswith('pipelines')]\n"
        "pickle.loads(blob)")
    assert "pipelines.pretrain" in loaded
    assert not [m for m in HEAVY if m in loaded]


def test_the_worker_function_runs_the_worker_module(monkeypatch):
    from pipelines import pretrain, pretrain_worker

    class FakeFeed:
        def __init__(self, run_uri):
            self.run_uri, self.closed = run_uri, False

        def close(self):
            self.closed = True

    seen, feeds = [], []
    monkeypatch.setattr(pretrain_worker, "train_fn_per_worker", lambda *args: seen.append(args))
    monkeypatch.setattr(pretrain, "start_feed", lambda config: feeds.append(FakeFeed(config["run_uri"])) or feeds[-1])
    pretrain.train_fn_per_worker({"run_uri": "x"})
    pretrain.train_fn_per_worker({"run_uri": "y", "export_only": True})  # nothing to train on: no data started
    assert seen == [({"run_uri": "x"}, feeds[0]), ({"run_uri": "y", "export_only": True}, None)]
    assert len(feeds) == 1 and feeds[0].run_uri == "x" and feeds[0].closed  # its reader stopped after the run

    def failing_worker(*args):
        raise RuntimeError("lost the engine")
    monkeypatch.setattr(pretrain_worker, "train_fn_per_worker", failing_worker)
    with pytest.raises(RuntimeError, match="lost the engine"):
        pretrain.train_fn_per_worker({"run_uri": "z"})
    assert feeds[1].run_uri == "z" and feeds[1].closed  # closed on an error too
    assert pretrain_worker.SetupError is pretrain.SetupError  # the policy and `clap pretrain` catch the workers'


def test_the_driver_loads_torch_before_it_connects_to_ray(tmp_path):
    # A `ray job submit` driver that first loads torch after ray.init dies in torch's MKL loader (seen with
    # `clap pretrain --data <a local folder>`: "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so").
    (tmp_path / "shards").mkdir()
    code = (
        "import sys\n"
        "import pipelines.pretrain as p\n"
        "from clap_core.train.config import load_pretrain_config\n"
        "assert 'torch' not in sys.modules\n"
        "def init_ray(**kwargs):\n"
        "    print('torch loaded at ray.init:', 'torch' in sys.modules)\n"
        "    raise SystemExit(0)\n"
        "p.init_ray = init_ray\n"
        f"p.pretrain({str(tmp_path / 'shards')!r}, {str(tmp_path / 'run')!r}, 'tiny', "
        "load_pretrain_config(p.DEFAULT_CONFIG, []))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "torch loaded at ray.init: True"
