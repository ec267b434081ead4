"""Hostile manifests: readers never crash and never drop or duplicate a row (JSONL, CSV, WebDataset,
sidecar folders, reserved id syntax)."""
from __future__ import annotations

import io
import json
import os
import tarfile

from clap_core.data.input_folders import sample_key
from clap_core.data.input_rows import escape_id, row_id
from clap_core.data.inputs import read_inputs
from clap_core.preprocess.config import load_preprocess_config
from clap_core.preprocess.plan import plan_units
from clap_core.preprocess.unit import process_row
from clap_demo.audio_files import encode_audio_file
from tests.fixtures.hostile import deep_json, tar_bytes, tone

WAV = encode_audio_file(tone(1.0), 16000, "wav")


def errors(rows: list[dict]) -> list:
    return [r["error"][0] if r["error"] else None for r in rows]


# -----------------------------------------------------------------------------
# JSONL


def test_jsonl_splits_on_newline_bytes_only(tmp_path):
    captions = ["a line\u2028separator", "next\u0085line", "para\u2029graph", "form\x0cfeed", "crlf"]
    lines = [json.dumps({"audio_path": f"{i}.wav", "caption": c}, ensure_ascii=False) for i, c in enumerate(captions)]
    (tmp_path / "m.jsonl").write_bytes(("\n".join(lines[:-1]) + "\r\n" + lines[-1] + "\n").encode())
    rows = read_inputs(tmp_path / "m.jsonl")
    assert [r["caption"] for r in rows] == captions and errors(rows) == [None] * 5  # old: 2 rejects per row


def test_deeply_nested_json_line_is_one_reject(tmp_path):
    lines = [json.dumps({"audio_path": "a.wav", "caption": "ok"}), deep_json(), json.dumps({"audio_path": "b.wav",
                                                                                             "caption": "ok"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    rows = read_inputs(tmp_path / "m.jsonl")  # old: RecursionError killed the job
    assert errors(rows) == [None, "bad_manifest_row", None] and "nested too deeply" in rows[1]["error"][1]


# -----------------------------------------------------------------------------
# CSV


def write_csv(tmp_path, text: str):
    path = tmp_path / "m.csv"
    path.write_text(text)
    return read_inputs(path)


def test_csv_fields_past_the_default_limit_parse_and_long_captions_are_rejected(tmp_path):
    huge = "x" * 200_000
    rows = write_csv(tmp_path, f"audio_path,caption,notes\na.wav,fine,{huge}\nb.wav,{huge},short\nc.wav,ok,\n")
    assert errors(rows) == [None, "caption_too_long", None]  # old: csv.Error killed the job
    assert rows[0]["caption"] == "fine" and rows[2]["source_path"] == "c.wav"


def test_csv_duplicate_used_columns_are_named_and_rejected(tmp_path):
    rows = write_csv(tmp_path, "audio_path,caption,caption\na.wav,first,second\nb.wav,x,y\n")
    assert errors(rows) == ["duplicate_column", "duplicate_column"] and "['caption']" in rows[0]["error"][1]
    rows = write_csv(tmp_path, "audio_path,caption,note,note\na.wav,first,1,2\n")
    assert errors(rows) == [None] and rows[0]["caption"] == "first"  # an unused repeated column is harmless


def test_csv_ragged_rows_are_rejected_with_their_line(tmp_path):
    rows = write_csv(tmp_path, "audio_path,caption,label\na.wav,ok,dog\nb.wav,too,many,fields\nc.wav,few\n"
                               "d.wav,fine,cat\n")
    assert errors(rows) == [None, "ragged_row", "ragged_row", None]
    assert "line 3 has 4 fields" in rows[1]["error"][1] and rows[3]["label"] == "cat"


def test_audiocaps_csv_ragged_row_is_its_own_reject(tmp_path):
    (tmp_path / "audio").mkdir()
    rows = write_csv(tmp_path, "audiocap_id,youtube_id,start_time,caption\n1,yt1,0,a dog\n2,yt1,0,a dog barks,extra\n"
                               "3,yt2,0,rain\n")
    assert sorted(map(str, errors(rows))) == ["None", "None", "ragged_row"] and len(rows) == 3


# -----------------------------------------------------------------------------
# WebDataset


def test_webdataset_key_keeps_the_folder_and_cuts_at_the_basename_dot():
    assert sample_key("shard.v2/a.flac") == ("shard.v2/a", "flac")
    assert sample_key("x/y.z/clip.seg.json") == ("x/y.z/clip", "seg.json")
    assert sample_key("plain.wav") == ("plain", "wav") and sample_key("dir.d/noext") is None


def test_webdataset_counts_every_member(tmp_path):
    meta = lambda text: json.dumps({"text": text}).encode()  # noqa: E731
    members = {"shard.v2/a.wav": WAV, "shard.v2/a.json": meta("a"), "shard.v2/b.wav": WAV,
                "shard.v2/b.json": meta("b"), "c.wav": WAV, "c.json": meta("c"),
                "orphan.json": meta("no audio"), "d.wav": WAV, "d.json": deep_json().encode(), "noext": b"x"}
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    rows = read_inputs(tmp_path / "s.tar")
    got = {r["id"]: (r["error"][0] if r["error"] else r["caption"]) for r in rows}
    assert got == {"shard.v2/a": "a", "shard.v2/b": "b", "c": "c", "orphan": "no_audio_member",
                   "d": "bad_manifest_row", "noext": "no_extension"}  # old: a and b were dropped


def test_webdataset_links_and_truncation_are_rejects(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"a.wav": WAV, "a.json": b'{"text": "a"}'}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.wav")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        info = tarfile.TarInfo("c.wav")
        info.size = len(WAV)
        tar.addfile(info, io.BytesIO(WAV))
    data = buf.getvalue()
    c_offset = tarfile.open(fileobj=io.BytesIO(data)).getmember("c.wav").offset_data
    (tmp_path / "s.tar").write_bytes(data[: c_offset + len(WAV) // 2])  # cut inside c.wav
    rows = read_inputs(tmp_path / "s.tar")
    assert [(r["id"], r["error"][0] if r["error"] else None) for r in rows][:2] == [("a", None),
                                                                                      ("b", "not_regular_member")]
    assert rows[-1]["error"][0] == "bad_tar"


# -----------------------------------------------------------------------------
# sidecar folders


def test_sidecar_folder_rejects_special_entries_and_never_follows_loops(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "good.wav").write_bytes(WAV)
    (root / "good.txt").write_text("a tone\n")
    (root / "folder.wav").mkdir()
    os.mkfifo(root / "pipe.wav")
    (root / "pipe.txt").write_text("never read\n")
    os.symlink("loop.wav", root / "loop.wav")
    os.symlink("/dev/null", root / "null.wav")
    os.symlink("..", root / "sub" / "up")  # a folder loop: corpus/sub/up/sub/up/...
    (root / "fifo_caption.wav").write_bytes(WAV)
    os.mkfifo(root / "fifo_caption.txt")  # opening it would hang the reader
    rows = read_inputs(root)
    got = {r["id"]: r["error"][0] if r["error"] else r["caption"] for r in rows}
    assert got == {"good": "a tone", "folder": "is_directory", "pipe": "fifo", "loop": "symlink_loop",
                   "null": "device", "fifo_caption": "bad_sidecar"}


# -----------------------------------------------------------------------------
# ids


def test_input_ids_cannot_collide_with_segment_or_copy_ids(tmp_path):
    assert escape_id("a#seg1") == "a%23seg1" and escape_id("50%#x") == "50%25%23x"
    assert row_id({"id": "clip#aug1"}) == "clip%23aug1" and row_id({"source_path": "x#y.wav", "id": None}) == "x%23y"
    (tmp_path / "long.wav").write_bytes(encode_audio_file(tone(2.5), 16000, "wav"))
    (tmp_path / "short.wav").write_bytes(WAV)
    lines = [{"audio_path": "long.wav", "caption": "long", "id": "c"},
             {"audio_path": "short.wav", "caption": "short", "id": "c#seg1"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = load_preprocess_config(None, ["audio.max_seconds=1.0", "audio.min_seconds=0.2"])
    plan = plan_units(read_inputs(tmp_path / "m.jsonl"), cfg)
    ids = [r["id"] for u in plan.units for row in u.rows for r in process_row(row, cfg)[0]]
    assert sorted(ids) == ["c#seg0", "c#seg1", "c#seg2", "c%23seg1"] and len(set(ids)) == len(ids)
