"""`pipelines.pretrain` on the shared local Ray: it learns, survives a killed worker, resumes a re-run, uses S3.

The corpus is generated: each clip is a tone whose pitch (low / middle / high), rhythm (steady / pulsed)
and background (quiet / hiss) are what its captions say, so text->audio retrieval can be learned from
sound alone. The clips are written as wav/flac/ogg/mp3 files and turned into shards by the real
preprocessing job, as a user's corpus would be.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.train
import torch

from clap_core.audio.codec import TARGET_SR
from clap_core.config import load_config
from clap_core.eval.metrics import retrieval_metrics
from clap_core.model.clap import ClapModel
from clap_core.preprocess.config import PreprocessConfig
from clap_core.train.batching import PairBatchTransform, decode_waves
from clap_core.train.config import load_pretrain_config
from clap_demo.audio_files import encode_audio_file
from pipelines.job_configs import default_config_path
from pipelines.preprocess import preprocess
from pipelines.pretrain import DEFAULT_CONFIG, pretrain

pytestmark = pytest.mark.integration

PITCHES = {"low": 220.0, "middle": 880.0, "high": 3520.0}
RHYTHMS = ("steady", "pulsed")
BACKGROUNDS = ("quiet", "hiss")
TEMPLATES = ("a {rhythm} {pitch} tone{background}", "{pitch} pitched {rhythm} beep{background}",
             "the sound of a {rhythm} {pitch} sine{background}")


def synth_clip(rng: np.random.Generator, pitch: str, rhythm: str, background: str, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * TARGET_SR)) / TARGET_SR
    freq = PITCHES[pitch] * rng.uniform(0.9, 1.1)
    wave = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.2, 0.4)
    if rhythm == "pulsed":
        wave *= (np.sin(2 * np.pi * rng.uniform(3, 5) * t) > 0).astype(np.float64)
    if background == "hiss":
        wave += rng.normal(0, 0.08, t.shape)
    else:
        wave += rng.normal(0, 0.002, t.shape)
    return np.clip(wave, -1, 1).astype(np.float32)


def captions_for(pitch: str, rhythm: str, background: str) -> list[str]:
    bg = " with hiss" if background == "hiss" else ""
    return [tpl.format(pitch=pitch, rhythm=rhythm, background=bg) for tpl in TEMPLATES]


FORMATS = ("wav", "flac", "ogg", "mp3")


def write_corpus(root: Path, splits: dict[str, int], seed: int = 0, seconds: float = 1.0) -> Path:
    """Audio files in mixed formats + manifest.jsonl; factors cycle so every split covers all 12 combinations."""
    rng = np.random.default_rng(seed)
    combos = [(p, r, b) for p in PITCHES for r in RHYTHMS for b in BACKGROUNDS]
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for split, count in splits.items():
        for i in range(count):
            pitch, rhythm, background = combos[(i + rng.integers(len(combos))) % len(combos)] if split == "train" \
                else combos[i % len(combos)]
            caps = captions_for(pitch, rhythm, background)
            fmt = FORMATS[i % len(FORMATS)] if split != "train" else FORMATS[i % 2]  # train: fast lossless codecs
            name = f"{split}-{i}.{fmt}"
            (root / name).write_bytes(encode_audio_file(synth_clip(rng, pitch, rhythm, background, seconds), TARGET_SR, fmt))
            records.append({"id": f"{split}-{i}", "audio_path": name, "caption": caps[0], "captions": caps[1:],
                            "label": f"{pitch}-{rhythm}-{background}", "split": split, "kind": "env"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "manifest.jsonl"


def preprocess_corpus(manifest: Path, out: Path) -> Path:
    """The real preprocessing job (Ray Data on the shared Ray) turns the corpus into shards."""
    cfg = load_config(PreprocessConfig, default_config_path("preprocess"), ["output.expected_clip_seconds=1.0"])
    result = preprocess(str(manifest), str(out), cfg)
    assert result["rejects"]["rows"] == 0 and result["rows_out"] == result["rows_in"]
    return out


def read_split(root: Path, split: str) -> pa.Table:
    return pq.read_table(root / split)


def heldout_t2a_r1(model: ClapModel, table: pa.Table) -> tuple[float, int]:
    """Text->audio R@1 of a model on a split (main caption of each clip), and the number of clips."""
    transform = PairBatchTransform.for_model(model.config, training=False)
    waves, lengths = decode_waves(table.column("audio").to_pylist(), transform.clip_samples, None)
    with torch.no_grad():
        audio = model.encode_audio(torch.from_numpy(waves), lengths=torch.from_numpy(lengths)).numpy()
        text = model.encode_text(**model.tokenize(table.column("caption").to_pylist())).numpy()
    return retrieval_metrics(audio, text, np.arange(len(waves)))["t2a/R@1"], len(waves)


def config(overrides: list[str]):
    base = ["scaling.num_workers=2", "scaling.max_failures=0", "scaling.resources_per_worker={CPU: 1}",
            "data.decode_tasks=2", "data.decode_batch_size=32", "data.shuffle_buffer=64", "train.warmup_steps=5",
            "train.log_every=1"]
    return load_pretrain_config(DEFAULT_CONFIG, base + overrides)


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    manifest = write_corpus(root / "audio", {"train": 1024, "valid": 24, "test": 36})
    return preprocess_corpus(manifest, root / "shards")


def test_pretraining_learns_and_exports(ray_local, corpus, tmp_path):
    """tiny, 2 workers, ZeRO-1, fixed seeds: held-out text->audio R@1 >= 3x chance; the export equals the engine."""
    run = tmp_path / "learn"
    # The corpus' clips last 1 s: tiny's 2 s windows would only repeat them (and double each step's conv work).
    cfg = config(["train.steps=90", "train.batch_size=16", "train.lr=2e-3", "train.eval_every=45",
                  "train.checkpoint_every=45", "train.log_every=10", "deepspeed.zero_stage=1",
                  "model.audio.clip_seconds=1.0"])
    result = pretrain(str(corpus), str(run), "tiny", cfg)
    assert result.error is None

    model = ClapModel.from_pretrained(run / "final")
    r1, n = heldout_t2a_r1(model, read_split(corpus, "test"))
    print(f"held-out t2a R@1 {r1:.3f} over {n} clips (chance {1 / n:.3f})")
    assert r1 >= 3.0 / n

    probe = np.load(run / "engine_probe.npz")
    with torch.no_grad():
        audio = model.encode_audio(torch.from_numpy(probe["waves"]), lengths=torch.from_numpy(probe["lengths"]))
        text = model.encode_text(torch.from_numpy(probe["input_ids"]), torch.from_numpy(probe["attention_mask"]))
    np.testing.assert_allclose(audio.numpy(), probe["audio_embeds"], atol=1e-5)
    np.testing.assert_allclose(text.numpy(), probe["text_embeds"], atol=1e-5)

    metrics = metrics_of(run)
    assert metrics["step"] == 90 and metrics["resumes"] == []
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["loss"] < first["loss"]
    assert {"loss", "temperature", "lr", "samples_per_s", "data_wait_share"} <= set(last)
    assert [e["step"] for e in metrics["evals"]] == [45, 90]
    assert {"t2a/R@1", "t2a/R@5", "t2a/R@10", "t2a/mAP@10", "a2t/R@1"} <= set(metrics["final_eval"])
    assert (run / "curves.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000045", "checkpoint_00000090"]


def test_rerun_same_command_resumes_on_s3(ray_local, corpus, s3_bucket, tmp_path):
    """Shards and run folder on S3 (moto), ZeRO-3 with the gradient cache, 1 worker (kept small: moto is slow),
    the wav2vec 2.0 speech tower. The first run dies (no retries); the same command again resumes it from its
    checkpoint, history intact; its export is the speech-tower model the engine trained (as
    test_speech_tower_pretrain_export_round_trip checks for the other towers, in one run for CI's budget).
    (A worker group restarted in the same run by scaling.max_failures:
    tests/e2e/test_faults_embed_probe.py::test_worker_node_lost_during_pretrain; --export-only:
    test_export_only_writes_the_same_final_again, slow tier.)"""
    import io

    import boto3

    from clap_core.storage import local_copy

    s3 = boto3.client("s3")
    for path in corpus.rglob("*.parquet"):
        s3.upload_file(str(path), s3_bucket, f"shards/{path.relative_to(corpus)}")
    data, output = f"s3://{s3_bucket}/shards", f"s3://{s3_bucket}/runs/rerun"
    cfg = config(["train.steps=6", "train.batch_size=8", "train.checkpoint_every=3", "train.eval_every=0",
                  "train.kill_worker_at_step=5", "deepspeed.zero_stage=3", "train.grad_cache_chunk=4",
                  "scaling.num_workers=1", "data.max_valid_clips=16"])

    with pytest.raises(ray.train.TrainingFailedError):  # max_failures=0: the killed worker ends the run
        pretrain(data, output, "tiny-wav2vec2", cfg)

    second = pretrain(data, output, "tiny-wav2vec2", cfg)  # same command: the fault marker keeps it from firing again
    assert second.error is None
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/rerun/")["Contents"]}
    assert "runs/rerun/final/model.safetensors" in keys
    metrics = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/rerun/metrics.json")["Body"].read())
    assert metrics["step"] == 6 and metrics["resumes"] == [3]
    assert [h["step"] for h in metrics["history"]] == list(range(1, 7))  # steps 4-5 were redone, recorded once
    # continuing, not restarting: the schedule came back with the checkpoint
    assert metrics["history"][3]["lr"] == pytest.approx(metrics["history"][2]["lr"], rel=0.5)
    checkpoints = {k.split("/")[2] for k in keys if k.startswith("runs/rerun/checkpoint_0")}
    assert checkpoints == {"checkpoint_00000003", "checkpoint_00000006"}  # train.keep_checkpoints=2
    assert_export_is_the_engine(ClapModel.from_pretrained(local_copy(f"{output}/final", str(tmp_path / "final"))),
                                np.load(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key="runs/rerun/engine_probe.npz")
                                                   ["Body"].read())), "wav2vec2")
    assert "t2a/R@1" in metrics["final_eval"]


# ~40 s more (one more Ray Train run) for CI's budget: the export-only path's checkpoint loading is unit-tested
# (tests/unit/train/test_safe_checkpoint.py)
@pytest.mark.slow
def test_export_only_writes_the_same_final_again(ray_local, corpus, s3_bucket, tmp_path):
    """--export-only on a finished run on S3 (ZeRO-3: the shards of the last checkpoint are consolidated again):
    the same final/ as the run's own export, nothing trained, the history intact."""
    import boto3

    from clap_core.storage import local_copy

    s3 = boto3.client("s3")
    for path in corpus.rglob("*.parquet"):
        s3.upload_file(str(path), s3_bucket, f"shards/{path.relative_to(corpus)}")
    data, output = f"s3://{s3_bucket}/shards", f"s3://{s3_bucket}/runs/export"
    cfg = config(["train.steps=3", "train.batch_size=8", "train.checkpoint_every=3", "train.eval_every=0",
                  "deepspeed.zero_stage=3", "scaling.num_workers=1", "data.valid_split=null"])
    assert pretrain(data, output, "tiny", cfg).error is None
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/export/")["Contents"]}
    exported = ClapModel.from_pretrained(local_copy(f"{output}/final", str(tmp_path / "first"))).state_dict()
    s3.delete_objects(Bucket=s3_bucket, Delete={"Objects": [{"Key": k} for k in keys
                                                            if k.startswith("runs/export/final/")]})
    assert pretrain(data, output, "tiny", cfg, export_only=True).error is None
    again = ClapModel.from_pretrained(local_copy(f"{output}/final", str(tmp_path / "again"))).state_dict()
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    metrics = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/export/metrics.json")["Body"].read())
    assert metrics["step"] == 3 and metrics["resumes"] == [3] and len(metrics["history"]) == 3


def assert_export_is_the_engine(model: ClapModel, probe, tower: str) -> None:
    """A speech-tower export: loads offline, embeds exactly as the engine did (`probe`: engine_probe.npz), the
    learned layer weights included."""
    assert model.config.audio_encoder.type == tower and model.config.audio_encoder.pretrained is None
    assert not torch.allclose(model.audio_encoder.mix.weights, torch.zeros(3))  # the layer weights trained
    with torch.no_grad():
        audio = model.encode_audio(torch.from_numpy(probe["waves"]), lengths=torch.from_numpy(probe["lengths"]))
    np.testing.assert_allclose(audio.numpy(), probe["audio_embeds"], atol=1e-5)


# slow tier, for CI's budget: CI trains the wav2vec 2.0 tower (ZeRO-3 with the gradient cache) and checks its
# export in test_rerun_same_command_resumes_on_s3; whisper's save/load round trip is a unit test
# (tests/unit/model/test_speech_towers.py), and ZeRO-2 steps are (tests/unit/train/test_losses_under_deepspeed.py)
@pytest.mark.slow
@pytest.mark.parametrize("name,overrides", [
    ("tiny-wav2vec2", ["deepspeed.zero_stage=2", "scaling.num_workers=1"]),  # 2 ranks: the learning test above
    ("tiny-whisper", ["deepspeed.zero_stage=3", "train.grad_cache_chunk=4", "scaling.num_workers=1"]),
])
def test_speech_tower_pretrain_export_round_trip(ray_local, corpus, tmp_path, name, overrides):
    """A few steps with each speech tower through the same job: the exported folder loads offline with
    `from_pretrained` and embeds exactly as the engine did, including the learned layer weights."""
    run = tmp_path / name
    cfg = config(["train.steps=4", "train.batch_size=8", "train.checkpoint_every=2", "train.eval_every=4",
                  "data.max_valid_clips=16", *overrides])
    result = pretrain(str(corpus), str(run), name, cfg)
    assert result.error is None
    assert_export_is_the_engine(ClapModel.from_pretrained(run / "final"), np.load(run / "engine_probe.npz"),
                                name.split("-")[1])
    metrics = metrics_of(run)
    assert metrics["step"] == 4 and "t2a/R@1" in metrics["final_eval"]
