"""Input adapters: JSONL/CSV manifests, AudioCaps and Clotho CSVs, sidecar folders, WebDataset tars,
and text that is not valid UTF-8 (kept visible for rejection, or decoded with a declared encoding)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clap_core import storage
from clap_core.audio.codec import decode_audio
from clap_core.data.inputs import read_inputs
from clap_core.preprocess.config import PreprocessConfig
from clap_core.preprocess.plan import plan_units
from clap_demo.audio_files import encode_audio_file


def wav_bytes(seconds: float = 0.5, sr: int = 16000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    return encode_audio_file((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, "wav")


def test_jsonl_paths_extra_captions_and_bad_lines(tmp_path):
    lines = [
        {"id": "a", "audio_path": "audio/a.wav", "caption": "dog", "captions": ["dog", "a dog barks"], "kind": "env"},
        {"audio_path": "/abs/b.flac", "caption": "cat", "caption_2": "a cat", "split": "valid", "language": "fr"},
        {"id": "c", "audio_path": "s3://bucket/c.mp3", "caption": "rain"},
        {"id": "d", "caption": "no path"},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n{not json\n\n" + "\n".join(json.dumps(x) for x in lines[2:])
    (tmp_path / "m.jsonl").write_text(text)
    rows = read_inputs(str(tmp_path / "m.jsonl"))

    assert [r["row_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["audio_uri"] == str(tmp_path / "audio/a.wav") and rows[0]["captions"] == ["dog", "a dog barks"]
    assert rows[0]["kind"] == "env" and rows[0]["source_path"] == "audio/a.wav"
    assert rows[1]["audio_uri"] == "/abs/b.flac" and rows[1]["captions"] == ["cat", "a cat"]
    assert rows[1]["split"] == "valid" and rows[1]["language"] == "fr" and rows[1]["id"] is None
    assert rows[2]["error"][0] == "bad_manifest_row"
    assert rows[3]["audio_uri"] == "s3://bucket/c.mp3"
    assert rows[4]["error"][0] == "missing_audio_path"


def test_audiocaps_csv_groups_captions_per_clip(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "yt1.wav").write_bytes(wav_bytes())
    (tmp_path / "test" / "Yyt2.flac").write_bytes(wav_bytes())
    csv_rows = ["audiocap_id,youtube_id,start_time,caption"]
    csv_rows += [f"{100 + k},yt1,30,caption {k} of yt1" for k in range(5)]
    csv_rows += [f"{200 + k},yt2,0,caption {k} of yt2" for k in range(5)]
    csv_rows += ["300,yt3,0,missing audio"]
    (tmp_path / "test.csv").write_text("\n".join(csv_rows) + "\n")
    rows = read_inputs(str(tmp_path / "test.csv"))

    assert [r["id"] for r in rows] == ["yt1", "yt2", "yt3"]
    assert rows[0]["captions"] == [f"caption {k} of yt1" for k in range(5)] and rows[0]["caption"] == "caption 0 of yt1"
    assert rows[0]["audio_uri"] == str(tmp_path / "test" / "yt1.wav")
    assert rows[1]["audio_uri"] == str(tmp_path / "test" / "Yyt2.flac")
    assert all(r["split"] == "test" for r in rows)
    assert not Path(rows[2]["audio_uri"]).exists()  # rejected later as missing_file


def test_clotho_csv_five_captions(tmp_path):
    audio = tmp_path / "clotho_audio"
    audio.mkdir()
    (audio / "rain on a roof.wav").write_bytes(wav_bytes())
    header = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5"
    line = '"rain on a roof.wav",rain falls,"drops, steady",water hits metal,a storm,rain'
    (tmp_path / "clotho_captions_evaluation.csv").write_text(f"{header}\n{line}\n")
    rows = read_inputs(str(tmp_path / "clotho_captions_evaluation.csv"), audio_dir=str(audio))

    assert len(rows) == 1 and rows[0]["id"] == "rain on a roof" and rows[0]["split"] == "test"
    assert rows[0]["captions"] == ["rain falls", "drops, steady", "water hits metal", "a storm", "rain"]
    assert Path(rows[0]["audio_uri"]).is_file()


@pytest.mark.parametrize("csv_name,folder,split", [("clotho_captions_development.csv", "development", "train"),
                                                   ("clotho_captions_evaluation.csv", "evaluation", "test"),
                                                   ("clotho_captions_validation.csv", "validation", "valid")])
def test_clotho_official_layout_finds_the_split_folder(tmp_path, csv_name, folder, split):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "rain.wav").write_bytes(wav_bytes())
    header = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5"
    (tmp_path / csv_name).write_text(f"{header}\nrain.wav,rain falls,drops,water,a storm,rain\n")
    rows = read_inputs(str(tmp_path / csv_name))  # no audio_dir
    assert rows[0]["error"] is None and rows[0]["split"] == split
    assert Path(rows[0]["audio_uri"]) == tmp_path / folder / "rain.wav"


def test_sidecar_folder_txt_json_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.wav").write_bytes(wav_bytes())
    (tmp_path / "a.txt").write_text("first caption\nsecond caption\n")
    (tmp_path / "sub" / "b.flac").write_bytes(wav_bytes())
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"text": ["speech here"], "kind": "speech", "label": "talk"}))
    (tmp_path / "c.mp3").write_bytes(b"no caption for me")
    rows = {r["id"]: r for r in read_inputs(str(tmp_path))}

    assert rows["a"]["captions"] == ["first caption", "second caption"] and rows["a"]["source_path"] == "a.wav"
    assert rows["sub/b"]["caption"] == "speech here" and rows["sub/b"]["kind"] == "speech"
    assert rows["sub/b"]["label"] == "talk" and rows["sub/b"]["error"] is None
    assert rows["c"]["error"][0] == "missing_caption"


def test_sidecars_are_read_side_by_side_and_rows_keep_the_listing_order(tmp_path, monkeypatch):
    """On object storage each sidecar is a request: they are read SIDECAR_READERS at a time (here against a
    storage that answers in 20 ms), and the rows come out in the listing order a serial read gives."""
    import time

    from clap_core.data import input_folders

    for i in range(48):
        (tmp_path / f"{i:03d}.wav").write_bytes(b"RIFF")
        if i % 7:
            (tmp_path / f"{i:03d}.txt").write_text(f"caption {i}")
    (tmp_path / "013.json").write_text("{broken")
    real = storage.read_bytes

    def slow(uri):
        time.sleep(0.02)
        return real(uri)

    monkeypatch.setattr(input_folders.storage, "read_bytes", slow)
    monkeypatch.setattr(input_folders, "SIDECAR_READERS", 1)
    serial = read_inputs(str(tmp_path))
    monkeypatch.setattr(input_folders, "SIDECAR_READERS", 16)
    start = time.perf_counter()
    rows = read_inputs(str(tmp_path))
    assert time.perf_counter() - start < 0.4  # 41 sidecars one after another: >= 0.82 s
    assert rows == serial and [r["row_index"] for r in rows] == list(range(48))
    assert [r["id"] for r in rows] == [f"{i:03d}" for i in range(48)]
    assert rows[5]["caption"] == "caption 5" and rows[7]["error"][0] == "missing_caption"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_read_audio_as_byte_ranges(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    audio = {f"s{k}": wav_bytes(0.5 + 0.1 * k) for k in range(3)}
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        for key in ("s0", "s1"):
            add_member(tar, f"{key}.flac", audio[key])
            add_member(tar, f"{key}.json", json.dumps({"text": [f"clip {key}", "alt"], "tag": ["x"]}).encode())
    with tarfile.open(shards / "shard-001.tar", "w") as tar:
        add_member(tar, "s2.flac", audio["s2"])  # no .json: rejected as missing_caption
    rows = read_inputs(str(shards))

    assert [r["id"] for r in rows] == ["s0", "s1", "s2"] and [r["row_index"] for r in rows] == [0, 1, 2]
    assert rows[0]["captions"] == ["clip s0", "alt"] and rows[0]["source_path"].endswith("shard-000.tar#s0.flac")
    for row in rows:
        assert storage.read_range(row["audio_uri"], row["byte_offset"], row["byte_size"]) == audio[row["id"]]
    assert rows[2]["error"][0] == "missing_caption"
    wave, _ = decode_audio(storage.read_range(rows[1]["audio_uri"], rows[1]["byte_offset"], rows[1]["byte_size"]))
    assert wave.shape == (1, 28800)


@pytest.mark.parametrize("encoding, expected", [("utf-8", None), ("cp1252", "café – déjà vu")])
def test_csv_with_cp1252_bytes(tmp_path, encoding, expected):
    text = "id,audio_path,caption\nok,a.wav,plain ascii\nlatin,b.wav,café – déjà vu\n"
    (tmp_path / "m.csv").write_bytes(text.encode("cp1252"))
    rows = read_inputs(str(tmp_path / "m.csv"), encoding=encoding)
    plan = plan_units(rows, PreprocessConfig())
    planned = {r["id"]: r for u in plan.units for r in u.rows}

    assert rows[0]["caption"] == "plain ascii" and planned["ok"]["planned_reject"] is None
    if expected is None:  # read as UTF-8: the bytes stay visible and the row is rejected, not mangled
        assert planned["latin"]["planned_reject"]["reason"] == "caption_not_utf8"
        assert "caf\\xe9" in planned["latin"]["planned_reject"]["detail"]
    else:
        assert rows[1]["caption"] == expected and planned["latin"]["planned_reject"] is None
