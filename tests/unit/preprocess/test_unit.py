"""Per-row and per-unit preprocessing without Ray: decoding rules, long-clip segments, silence,
deterministic augmentation and env mixes, deterministic planning, atomic commits and resume cleanup."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from clap_core import storage
from clap_core.audio.codec import decode_flac
from clap_core.config import to_dict
from clap_core.data.input_rows import new_row
from clap_core.data.inputs import read_inputs
from clap_core.data.markers import check_markers, read_markers
from clap_core.data.shards import (
    SHARD_SCHEMA,
    build_index,
    clean_uncommitted,
    iter_shard_rows,
    read_index,
    read_shards,
    write_index,
)
from clap_core.preprocess.config import load_preprocess_config
from clap_core.preprocess.plan import content_hash, job_config, plan_units, rows_per_unit
from clap_core.preprocess.unit import process_row, process_unit
from clap_demo.audio_files import encode_audio_file
from clap_demo.synth import ClipSpec, make_clip, write_corpus


def write_clip(path, seconds: float, sr: int = 16000, spec: ClipSpec = ClipSpec(), channels: int = 1) -> str:
    wave = make_clip(spec, sr, seconds)
    path.write_bytes(encode_audio_file(np.stack([wave] * channels), sr, "wav"))
    return str(path)


def planned(rows: list[dict], *overrides: str) -> list[dict]:
    plan = plan_units(rows, load_preprocess_config(None, list(overrides)))
    return sorted((r for u in plan.units for r in u.rows), key=lambda r: r["row_index"])


def one(tmp_path, seconds: float, *overrides: str, caption: str = "a tone", **clip) -> tuple[list, list]:
    uri = write_clip(tmp_path / "clip.wav", seconds, **clip)
    row = planned([new_row(0, "clip.wav", uri, [caption], id="c")], *overrides)[0]
    return process_row(row, load_preprocess_config(None, list(overrides)))


def test_clip_becomes_48k_flac_row(tmp_path):
    rows, rejects = one(tmp_path, 1.25, sr=16000, channels=2)
    assert rejects == [] and len(rows) == 1
    row = rows[0]
    wave, sr = decode_flac(row["audio"])
    assert sr == row["sample_rate"] == 48_000 and wave.shape == (1, 60_000) == (1, row["num_samples"])
    assert row["duration_s"] == pytest.approx(1.25) and row["augment"] == "{}" and row["source_id"] == "c"
    assert set(row) == set(SHARD_SCHEMA.names)


def test_long_clip_split_into_equal_segments_or_rejected(tmp_path):
    rows, _ = one(tmp_path, 2.5, "audio.max_seconds=1.0", "audio.min_seconds=0.2")
    assert [r["id"] for r in rows] == ["c#seg0", "c#seg1", "c#seg2"]
    assert sum(r["num_samples"] for r in rows) == 120_000 and all(r["duration_s"] <= 1.0 for r in rows)
    assert [json.loads(r["augment"])["segment"]["index"] for r in rows] == [0, 1, 2]
    rows, rejects = one(tmp_path, 2.5, "audio.max_seconds=1.0", "audio.min_seconds=0.2", "audio.long_clip=reject")
    assert rows == [] and rejects[0]["reason"] == "too_long" and rejects[0]["stage"] == "validate"


def test_silence_rejected_or_kept(tmp_path):
    path = tmp_path / "quiet.wav"
    path.write_bytes(encode_audio_file(np.full(16000, 1e-4, np.float32), 16000, "wav"))  # -80 dBFS
    row = planned([new_row(0, "quiet.wav", str(path), ["hum"], id="q")])[0]
    assert process_row(row, load_preprocess_config())[1][0]["reason"] == "silent"
    assert len(process_row(row, load_preprocess_config(None, ["audio.silence=keep"]))[0]) == 1


def test_augmented_copies_are_deterministic_and_recorded(tmp_path):
    overrides = ("augment.copies=2", "augment.reverb_prob=1.0", "augment.freq_mask_prob=1.0")
    first, _ = one(tmp_path, 1.0, *overrides)
    again, _ = one(tmp_path, 1.0, *overrides)
    other_seed, _ = one(tmp_path, 1.0, *overrides, "augment.seed=1")
    assert [r["id"] for r in first] == ["c", "c#aug1", "c#aug2"]
    assert [r["audio"] for r in first] == [r["audio"] for r in again]
    assert [r["augment"] for r in first] == [r["augment"] for r in again]
    record = json.loads(first[1]["augment"])
    assert record["reverb"]["ir"] == "synthetic" and "center_hz" in record["freq_mask"]
    assert first[1]["audio"] != first[2]["audio"] and first[1]["audio"] != other_seed[1]["audio"]


def test_speech_copies_mix_env_partner_and_merge_captions(tmp_path):
    speech = write_clip(tmp_path / "s.wav", 1.0, spec=ClipSpec(kind="speech"))
    env = write_clip(tmp_path / "e.wav", 0.7, spec=ClipSpec(kind="env", seed=5))
    rows = [new_row(0, "s.wav", speech, ["A man speaks."], id="s", kind="speech"),
            new_row(1, "e.wav", env, ["Rain on a roof"], id="e", kind="env")]
    cfg = load_preprocess_config(None, ["augment.copies=1", "augment.mix_lambda_range=[0.3,0.3]"])
    out, _ = process_row(planned(rows, "augment.copies=1")[0], cfg)
    record = json.loads(out[1]["augment"])
    assert record["env_mix"] == {"env_id": "e", "lambda": pytest.approx(0.3), "caption_merger": {
        "name": "template", "template": "a person saying {speech}, with {env} in the background"}}
    assert out[1]["caption"] == "a person saying a man speaks, with rain on a roof in the background"
    assert out[0]["caption"] == "A man speaks." and out[1]["num_samples"] == out[0]["num_samples"]


def test_augment_provenance_names_the_caption_merger(tmp_path):
    speech = write_clip(tmp_path / "s.wav", 1.0, spec=ClipSpec(kind="speech"))
    env = write_clip(tmp_path / "e.wav", 0.7, spec=ClipSpec(kind="env", seed=5))
    rows = [new_row(0, "s.wav", speech, ["A man speaks."], id="s", kind="speech"),
            new_row(1, "e.wav", env, ["Rain"], id="e", kind="env")]
    overrides = ["augment.copies=1", "captions.template='{speech} over {env}'"]
    out, _ = process_row(planned(rows, *overrides)[0], load_preprocess_config(None, overrides))
    record = json.loads(out[1]["augment"])
    assert record["copy"] == 1
    assert record["env_mix"]["caption_merger"] == {"name": "template", "template": "{speech} over {env}"}
    assert out[1]["caption"] == "a man speaks over rain"


@pytest.mark.parametrize("split,splits,expected", [("train", None, 3), ("valid", None, 1), ("test", None, 1),
                                                    ("valid", "[train, valid]", 3)])
def test_evaluation_splits_keep_the_clean_clip_only(tmp_path, split, splits, expected):
    overrides = ["augment.copies=2"] + ([f"augment.splits={splits}"] if splits else [])
    uri = write_clip(tmp_path / "clip.wav", 1.0)
    row = planned([new_row(0, "clip.wav", uri, ["a tone"], id="c", split=split)], *overrides)[0]
    rows, _ = process_row(row, load_preprocess_config(None, overrides))
    assert len(rows) == expected and rows[0]["id"] == "c" and rows[0]["augment"] == "{}"


def test_env_partners_are_planned_only_for_augmented_splits(tmp_path):
    speech = write_clip(tmp_path / "s.wav", 1.0, spec=ClipSpec(kind="speech"))
    env = write_clip(tmp_path / "e.wav", 0.7, spec=ClipSpec(kind="env", seed=5))
    rows = [new_row(0, "s.wav", speech, ["A man speaks."], id="s", kind="speech", split="test"),
            new_row(1, "e.wav", env, ["Rain"], id="e", kind="env", split="test")]
    assert all(not r["env_partners"] for r in planned(rows, "augment.copies=2"))


def test_planning_rejects_and_is_independent_of_input_order():
    rows = [new_row(i, f"a/{i}.wav", f"/x/{i}.wav", [f"clip {i}"], id=f"id{i % 7}", split=["train", "valid"][i % 2])
            for i in range(20)]
    rows += [new_row(20, "b.wav", "/x/b.wav", ["  "]), new_row(21, "c.wav", "/x/c.wav", ["x"], split="../etc")]
    cfg = load_preprocess_config(None, ["output.rows_per_unit=3"])
    plan = plan_units(rows, cfg)
    reasons = {r["row_index"]: (r["planned_reject"] or {}).get("reason") for u in plan.units for r in u.rows}
    assert sum(v == "duplicate_id" for v in reasons.values()) == 13 and reasons[20] == "empty_caption"
    assert reasons[21] == "bad_split" and all(reasons[i] is None for i in range(7))
    assert sum(len(u.rows) for u in plan.units) == 22 and plan.rows_in == 22

    accepted = [r for r in rows if r["row_index"] < 7]
    shuffled = accepted[:]
    random.Random(0).shuffle(shuffled)
    units = lambda rs: [[r["id"] for r in u.rows] for u in plan_units(rs, cfg).units]  # noqa: E731
    assert units(accepted) == units(shuffled)
    assert {u.key for u in plan_units(accepted, cfg).units} == {"train-00000", "train-00001", "valid-00000"}


def test_rows_per_unit_follows_shard_size():
    assert rows_per_unit(load_preprocess_config()) == 444  # 256 MB / (10 s * 48 kHz * 2 B * 0.6)
    assert rows_per_unit(load_preprocess_config(None, ["augment.copies=3"])) == 111
    assert rows_per_unit(load_preprocess_config(None, ["output.rows_per_unit=7"])) == 7


def test_units_commit_atomically_and_resume_cleans_debris(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", 6, seed=1, seconds=(0.6, 0.8))
    cfg = load_preprocess_config(None, ["output.rows_per_unit=2", "output.shard_mb=0.02"])
    plan = plan_units(read_inputs(str(manifest)), cfg)
    out = str(tmp_path / "out")
    first = process_unit(plan.units[0], cfg, out)
    assert len(first.shards) == 2  # rolled over at shard_mb
    stray = [f"{out}/{plan.units[1].split}/part-{plan.units[1].index:05d}-000.parquet",
             f"{out}/train/{storage.TEMP_PREFIX}abc-part-00009-000.parquet"]
    for uri in stray:
        storage.put_atomic(uri, b"debris")
    markers = read_markers(out)
    assert markers == {first.unit: first}  # the marker on disk reads back as the one returned
    check_markers(plan.unit_hashes(), markers, out)
    assert sorted(clean_uncommitted(out, sorted({u.split for u in plan.units}), markers)) == sorted(stray)
    for unit in plan.units[1:]:
        process_unit(unit, cfg, out)
    markers = read_markers(out)
    index = build_index([markers[u.key] for u in plan.units], input_uri=str(manifest), job_hash=plan.job_hash,
                        rows_in=plan.rows_in, config=to_dict(cfg), config_hash=content_hash(job_config(cfg)))
    write_index(out, index)
    assert read_index(out) == index and (tmp_path / "out" / "manifest.json").is_file()
    assert sum(1 for _ in iter_shard_rows(out)) == index["rows_out"] == 6 == len(read_shards(out))
    assert index["units"] == len(plan.units) and index["shards"] == [s for u in plan.units for s in markers[u.key].shards]
    assert not [f for f in storage.list_files(out) if storage.TEMP_PREFIX in f]
    other = plan_units(read_inputs(str(manifest)), load_preprocess_config(None, ["output.rows_per_unit=2",
                                                                                   "audio.silence=keep"]))
    with pytest.raises(ValueError, match="different job"):
        check_markers(other.unit_hashes(), read_markers(out), out)


def test_evaluation_on_shards_reads_one_row_per_source_clip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clap_core.eval.sources import iter_eval_items
    from tests.fixtures.shards import shard_row, tone

    wave = tone(440.0, 0.5)
    rows = [shard_row("a", wave, "a tone", "tone", "test"),
            {**shard_row("a#aug1", wave, "a tone", "tone", "test"), "augment": json.dumps({"copy": 1})},
            {**shard_row("a#aug2", wave, "a tone", "tone", "test"), "augment": "{}"},  # older shards: the id tells
            {**shard_row("b#seg0", wave, "b tone", "tone", "test"), "augment": json.dumps({"segment": {"index": 0}})}]
    (tmp_path / "test").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), tmp_path / "test" / "part-0.parquet")
    assert [item.id for item, _ in iter_eval_items(str(tmp_path), "test")] == ["a", "b#seg0"]
    assert len(list(iter_eval_items(str(tmp_path), "test", augmented=True))) == 4
