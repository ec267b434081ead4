"""Killed drivers and lost nodes for `clap embed`, `clap tune-probe` and `clap pretrain`, on a two-node local
Ray cluster.

The commands run as real `clap` processes (their own process group) with RAY_ADDRESS set to a head + worker
node cluster started once for this module (tests/e2e/ray_cluster.py). A driver is killed with SIGKILL on its
process group at a kill point read from its output (the first embedding file written; the first trial
checkpoint of the sweep), as a lost driver pod would be; the same command is then run again. The worker node
is killed the same way, once an embedding actor lives on it or two steps after the first training checkpoint,
and a replacement node joins (as an autoscaler would add one).

Embedding values are compared with the undisturbed reference: the job's own decode and embed steps run in
this process without Ray (fp32, so batch composition cannot move a value by more than float rounding).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clap_core.data import embeddings
from clap_core.data.inputs import read_inputs
from clap_core.data.shards import SHARD_SCHEMA
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_demo.synth import write_corpus
from pipelines import cli
from pipelines.embed import EmbedBatch, decode_row
from pipelines.embed_input import manifest_item
from tests.e2e.ray_cluster import LocalRayCluster
from tests.fixtures.shards import TONES, shard_row, tone

# CI runs the node lost during pretrain (~2 min with the cluster); the node lost during embed and the killed
# embed and tune-probe drivers are in the slow tier (`make test-all`), for CI's budget
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
CLIPS = 24
EMBED = ["--batch-size", "2", "--concurrency", "2", "--precision", "fp32"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (no CPU: it schedules, it runs no task) + one worker node (3 CPUs), no authentication (a private test
    cluster). Every task and actor of a job runs on the worker node, so losing it loses work in flight."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               HOME=str(tmp_path_factory.mktemp("home")),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    c = LocalRayCluster(env=env, num_cpus=3, head_cpus=0).start()
    yield c
    c.stop(grace_s=1)  # the module's own cluster, its jobs ended: nothing to flush (SIGTERM alone takes ~15 s)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(checkpoint folder, manifest, {id: (audio embedding, text embedding)} of the undisturbed reference)."""
    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(root / "ckpt")
    manifest = write_corpus(root / "corpus", CLIPS, seed=3, formats=("wav", "flac"), seconds=(0.5, 1.0))
    items = [manifest_item(r) for r in read_inputs(str(manifest))]
    embed = EmbedBatch(str(root / "ckpt"), batch_size=2, text=True, precision="fp32")
    batch = {"id": np.array([i["id"] for i in items]), "caption": np.array([i["caption"] for i in items]),
             "wave": np.array([decode_row(i) for i in items] + [None], dtype=object)[:-1]}
    out = embed(batch)
    reference = {i: (a, t) for i, a, t in zip(out["id"], out["audio_embedding"], out["text_embedding"])}
    assert len(reference) == CLIPS
    return root / "ckpt", manifest, reference


def start(cluster: LocalRayCluster, *args: str, log: Path) -> subprocess.Popen:
    """A `clap` command as a driver of the cluster, in its own process group (what a SIGKILL ends)."""
    env = dict(cluster.env, RAY_ADDRESS=f"127.0.0.1:{cluster.gcs_port}")
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def last_json(text: str) -> dict:
    """The command's result line (Ray may print its workers' log lines after it)."""
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def kill_when(proc: subprocess.Popen, ready, what: str, timeout_s: float = 240) -> None:
    """SIGKILL the driver's process group as soon as `ready()` holds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, f"the driver exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def data_files(output: Path) -> list[Path]:
    return sorted((output / "data").glob("*.parquet"))


def assert_equals_reference(output: Path, reference: dict) -> None:
    """Every clip exactly once, each value within 1e-6 of the undisturbed run."""
    table = embeddings.read_table(str(output))
    ids = table.column("id").to_pylist()
    assert ids == sorted(reference), f"{len(ids)} rows, {len(set(ids))} distinct ids"
    audio = embeddings.embedding_matrix(table, "audio_embedding")  # (N, D)
    text = embeddings.embedding_matrix(table, "text_embedding")  # (N, D)
    np.testing.assert_allclose(audio, np.stack([reference[i][0] for i in ids]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(text, np.stack([reference[i][1] for i in ids]), atol=1e-6, rtol=0)
    # the manifest lists exactly the data files of the run that finished; any other one is a killed run's
    manifest = embeddings.read_index(str(output))
    assert manifest["rows"] == CLIPS and manifest["rejects"]["rows"] == 0
    own = [p for p in data_files(output) if p.name.startswith(embeddings.file_prefix(manifest["attempt"]))]
    assert sorted(f["path"] for f in manifest["files"]) == [f"data/{p.name}" for p in own]
    assert all(p.name.split("_")[0] in manifest["attempts"] for p in data_files(output))


@pytest.mark.slow
def test_killed_embed_driver_then_same_command(cluster, corpus, tmp_path, capsys):
    ckpt, manifest, reference = corpus
    output = tmp_path / "emb"
    command = ["embed", "--checkpoint", str(ckpt), "--input", str(manifest), "--output", str(output), *EMBED]
    killed = start(cluster, *command, log=tmp_path / "killed.log")
    kill_when(killed, lambda: bool(data_files(output)), "embedding file written")

    # What the killed job left: some data files, a manifest still "running". A reader sees a clear error.
    state = embeddings.read_index(str(output))
    assert state["state"] == "running" and data_files(output), "the kill came after the commit: no kill point"
    with pytest.raises(FileNotFoundError, match="has not finished"):
        embeddings.read_table(str(output))
    assert cli.main(["search", "a tone", "--index", str(output), "--checkpoint", str(ckpt)]) == 2
    assert "has not finished (state 'running')" in capsys.readouterr().err

    text = finish(start(cluster, *command, log=tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert last_json(text) == {"rows": CLIPS, "rejects": 0, "reject_reasons": {}}
    assert_equals_reference(output, reference)


def trial_folders(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.glob("trial_*") if p.is_dir())


# 45-100 s on the shared 2-core machine: two sweeps
@pytest.mark.slow
def test_killed_tune_probe_driver_then_same_command(cluster, tmp_path):
    from clap_demo.synth_meld import write_meld

    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(tmp_path / "ckpt")
    write_meld(tmp_path / "meld", "reorganised", {"train": 3, "dev": 2, "test": 2}, corrupt=False, seed=4)
    output = tmp_path / "sweep"
    trials = 3
    command = ["tune-probe", "--meld", str(tmp_path / "meld"), "--checkpoint", str(tmp_path / "ckpt"),
               "--output", str(output), f"tune.num_samples={trials}", "tune.max_concurrent_trials=2",
               "search.epochs=[4,6]", "probe.epochs=5", "tune.grace_period=6", "embed.concurrency=1"]
    experiment = output / "meld_probe"
    killed = start(cluster, *command, log=tmp_path / "killed.log")
    # kill point: the first trial checkpoint of the sweep, i.e. mid-trial (every trial runs >= 4 epochs)
    kill_when(killed, lambda: any(experiment.glob("trial_*/checkpoint_*")), "trial checkpoint")
    assert not (output / "summary.json").exists()

    text = finish(start(cluster, *command, log=tmp_path / "rerun.log"), tmp_path / "rerun.log", timeout_s=400)
    assert "resuming the sweep" in text, text[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["trials"] == trials
    assert last_json(text) == summary
    folders = trial_folders(experiment)
    assert len(folders) == trials, [p.name for p in folders]
    for folder in folders:
        epochs = [json.loads(line)["epoch"] for line in (folder / "result.json").read_text().splitlines()]
        assert epochs == list(range(1, len(epochs) + 1)), (folder.name, epochs)  # no epoch reported twice


@pytest.mark.slow  # ~1 min; CI keeps an embedding run's exactly-once commit after a kill in
# tests/integration/test_embed_search.py::test_late_files_of_a_killed_run_are_never_read
def test_worker_node_lost_during_embed(cluster, corpus, tmp_path):
    """The worker node is SIGKILLed as soon as an embedding actor is alive on it; the job waits for the
    replacement node (as an autoscaler adds one) and finishes there."""
    ckpt, manifest, reference = corpus
    output = tmp_path / "emb"
    command = ["embed", "--checkpoint", str(ckpt), "--input", str(manifest), "--output", str(output), *EMBED]
    job = start(cluster, *command, log=tmp_path / "job.log")
    deadline = time.monotonic() + 240
    while not actors_on_worker_node(cluster):
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-4000:]
        time.sleep(0.2)
    assert embeddings.read_index(str(output))["state"] == "running", "the job finished before the kill point"
    cluster.kill_worker_node()
    cluster.add_worker_node()
    finish(job, tmp_path / "job.log")
    assert_equals_reference(output, reference)


def actors_on_worker_node(cluster: LocalRayCluster) -> list[str]:
    """The job's live decode+embed actors (Ray Data fuses both stages into `MapWorker`s) on the worker node."""
    from ray.util.state import list_actors, list_nodes

    workers = {n.node_id for n in list_nodes(address=cluster.dashboard_url) if not n.is_head_node}
    return [a.actor_id for a in list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
            if a.node_id in workers and "MapWorker" in a.class_name]


PRETRAIN_STEPS, CHECKPOINT_EVERY = 16, 4  # the kill lands a few steps after step 4 (registration: one Train poll)


@pytest.mark.timeout(600)  # bounded, the module's cluster start included: kill point <= 240 s, end <= 300 s after
def test_worker_node_lost_during_pretrain(cluster, tmp_path):
    """The worker node (both training workers, the data ingest) is SIGKILLed two steps after the first
    checkpoint is reported; a replacement node joins. The shipped scaling.max_failures (Ray Train's FailureConfig) restarts the
    worker group there from the last reported checkpoint and the run ends at the configured step.

    Invariants: metrics.json's history (the run log, restored with the checkpoint) holds every step exactly once,
    with one resume at a checkpoint step; the console's step lines repeat only the steps after that checkpoint
    (the lost group ran them, the new group redid them from the checkpoint), never one before it."""
    rows = [shard_row(f"{label.replace(' ', '-')}-{i}", tone(freq, 1.0, phase=0.1 * i), f"a clip of a {label}", label,
                      "train") for label, freq in TONES.items() for i in range(16)]  # 48 one-second tones
    (tmp_path / "shards" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), tmp_path / "shards" / "train" / "part-0.parquet")
    run = tmp_path / "run"
    command = ["pretrain", "--data", str(tmp_path / "shards"), "--output", str(run), "--model", "tiny",
               f"train.steps={PRETRAIN_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.batch_size=4",
               "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2", "data.valid_split=null",
               "data.decode_tasks=1", "data.shuffle_buffer=0",
               "data.min_epoch_rows=384"]  # 8 reads of the 48 rows: no epoch boundary in the run
    # scaling: the shipped defaults (2 workers, max_failures 3)
    log = tmp_path / "pretrain.log"
    job = start(cluster, *command, log=log)
    # kill point: Ray Train's controller has registered the first checkpoint (the driver prints "checkpoint N
    # saved" from its callback) and the group is two steps past it: the lost group's last steps are redone
    registered = re.compile(rf"^checkpoint {CHECKPOINT_EVERY} saved: ", flags=re.M)
    reported = re.compile(rf"^step {CHECKPOINT_EVERY + 2}/{PRETRAIN_STEPS} ", flags=re.M)
    kill_when_ready = time.monotonic() + 240
    while not (registered.search(text := log.read_text()) and reported.search(text)):
        assert job.poll() is None and time.monotonic() < kill_when_ready, text[-4000:]
        time.sleep(0.2)
    assert not (run / "final").exists(), "the run finished before the kill point"
    cluster.kill_worker_node()
    cluster.add_worker_node()
    text = finish(job, log, timeout_s=300)  # about 200 s measured at load 50 on the 2-core machine
    assert last_json(text)["step"] == PRETRAIN_STEPS

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == PRETRAIN_STEPS and len(metrics["resumes"]) == 1, metrics["resumes"]
    restored = metrics["resumes"][0]
    assert restored % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= restored < PRETRAIN_STEPS
    assert [h["step"] for h in metrics["history"]] == list(range(1, PRETRAIN_STEPS + 1))  # each step once

    # the console: 1, 2, ... up to where the lost group got, then restored + 1, ..., the last step: one jump back
    # at most (none when the group was lost right after the checkpoint), always to the step after the checkpoint
    console = [int(m) for m in re.findall(rf"^step (\d+)/{PRETRAIN_STEPS} ", text, flags=re.M)]
    jumps = [i for i in range(1, len(console)) if console[i] != console[i - 1] + 1]
    print(f"restored from checkpoint {restored}; console steps {console}")
    assert console[0] == 1 and console[-1] == PRETRAIN_STEPS and len(jumps) <= 1, console
    assert all(console[i] == restored + 1 and console[i - 1] >= restored for i in jumps), console

    model = ClapModel.from_pretrained(run / "final")  # the export of the restored-then-finished run
    with torch.no_grad():
        emb = model.embed_audio(tone(440.0, 1.0), sample_rate=48_000)  # (1, D)
    assert emb.shape == (1, get_model_config("tiny").embed_dim) and np.isfinite(emb).all()
