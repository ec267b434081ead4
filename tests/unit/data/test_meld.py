"""MELD layouts, CSV decoding (cp1252 / UTF-8 / stray bytes) and the manifest handed to `clap embed`."""
import shutil

import numpy as np
import pytest

from clap_core.audio.codec import AudioDecodeError, decode_audio
from clap_core.data.inputs import read_inputs
from clap_core.data.meld import EMOTIONS, decode_csv_bytes, decode_line, find_layout, read_meld, write_inputs
from clap_core.data.rejects import rejects_table
from clap_demo.synth_meld import HEADER, SOUND, csv_path, write_meld

TINY = {"train": 1, "dev": 1, "test": 1}


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("MELD.Raw")
    return root, write_meld(root, "raw", TINY, neutral_factor=1, seconds=0.5)


def test_decode_line_prefers_utf8_then_cp1252_then_latin1():
    assert decode_line("caf\u00e9 \u2019".encode("utf-8")) == "caf\u00e9 \u2019"
    assert decode_line(b"I can\x92t") == "I can\u2019t"  # cp1252 right single quote
    assert decode_line(b"bad \x81 byte") == "bad \x81 byte"  # undefined in cp1252: latin-1 keeps the byte
    assert decode_csv_bytes(b"\xef\xbb\xbfa,b\r\n") == "a,b\r\n"  # Excel's BOM


def test_raw_layout_rows_cover_every_csv_line_with_clips_and_labels(raw_corpus):
    root, written = raw_corpus
    rows, rejects = read_meld(root)
    assert rejects == []
    expected = [(clip_id, emotion, text) for split in ("train", "dev", "test") for clip_id, emotion, text in written[split]]
    got = [(r["id"], r["label"], r["caption"]) for r in rows]
    assert got == expected  # CSV order, every line, utterances decoded exactly
    assert {r["split"] for r in rows} == {"train", "dev", "test"}
    captions = " ".join(r["caption"] for r in rows)
    assert "can\u2019t" in captions and "caf\u00e9" in captions and "\x81" in captions
    assert not any("\ufffd" in r["caption"] for r in rows)
    test_clip = next(r for r in rows if r["id"] == "test/dia0_utt0")
    assert test_clip["audio_path"] == str(root / "output_repeated_splits_test" / "dia0_utt0.mp4")


def test_raw_layout_finds_clip_folders_nested_per_split(tmp_path):
    for split, folder in (("train", "train_splits"), ("dev", "dev_splits_complete"),
                          ("test", "output_repeated_splits_test")):
        (tmp_path / f"{split}_sent_emo.csv").write_text(",".join(HEADER) + "\n")
        (tmp_path / split / folder).mkdir(parents=True)
    layout = find_layout(tmp_path)
    assert layout["test"].clips == tmp_path / "test" / "output_repeated_splits_test"


def test_reorganised_layout_from_root_or_meld_folder(tmp_path):
    written = write_meld(tmp_path, "reorganised", {"train": 1, "dev": 1, "test": 1}, neutral_factor=1, seconds=0.3,
                         corrupt=False)
    for root in (tmp_path, tmp_path / "meld"):
        layout = find_layout(root)
        assert layout["dev"].csv == tmp_path / "meld" / "dev" / "dev_sent_emo.csv"
        assert layout["dev"].clips == tmp_path / "meld" / "dev" / "videofiles"
    rows, _ = read_meld(tmp_path)
    assert len(rows) == sum(len(v) for v in written.values())
    assert all(r["audio_path"].endswith(".mp4") and "videofiles" in r["audio_path"] for r in rows)


def test_not_a_meld_folder_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="train,dev,test"):
        find_layout(tmp_path)


def test_bad_csv_lines_are_rejected_with_a_reason_not_dropped(raw_corpus, tmp_path):
    root, _ = raw_corpus
    copy = tmp_path / "meld"
    shutil.copytree(root, copy)
    path = csv_path(copy, "raw", "dev")
    path.write_bytes(path.read_bytes() + b"99,Huh?,Ross,Confused,neutral,5,1,1,1,a,b\r\n"
                                        b"100,Hm,Ross,Joy,positive,x,1,1,1,a,b\r\n")
    rows, rejects = read_meld(copy)
    assert [(r["id"], r["reason"], r["stage"]) for r in rejects] == [
        ("dev/dia5_utt1", "unknown_emotion", "read_meld"), ("dev/line10", "bad_ids", "read_meld")]
    assert rejects_table(rejects).to_pylist() == rejects  # the reject record of every job, nothing lost
    assert len(rows) == 3 * len(EMOTIONS) + 1  # the corrupt test clip is a row: it is rejected at decode


def test_inputs_round_trip_through_the_embedding_jobs_reader(raw_corpus, tmp_path):
    root, _ = raw_corpus
    rows, _ = read_meld(root)
    write_inputs(rows, str(tmp_path / "manifest.jsonl"))
    read = read_inputs(str(tmp_path / "manifest.jsonl"))
    assert [r["id"] for r in read] == [r["id"] for r in rows]
    assert [r["audio_uri"] for r in read] == [r["audio_path"] for r in rows]
    assert [r["caption"] for r in read] == [r["caption"] for r in rows]
    assert [(r["label"], r["split"]) for r in read] == [(r["label"], r["split"]) for r in rows]


def test_audio_track_of_the_mp4_clips_decodes_at_48k_and_the_corrupt_one_is_a_reject(raw_corpus):
    root, _ = raw_corpus
    rows, _ = read_meld(root)
    for row in [r for r in rows if r["split"] == "train"][:3]:  # with and without a video stream
        wave, sr = decode_audio(row["audio_path"], mono=True, target_sr=48_000)
        assert sr == 48_000 and wave.shape[0] == 1 and 0.45 < wave.shape[1] / sr < 0.6
        spectrum = np.abs(np.fft.rfft(wave[0]))
        peak = np.fft.rfftfreq(wave.shape[1], 1 / sr)[spectrum.argmax()]
        assert abs(peak / SOUND[row["label"]][0] - 1) < 0.08  # the emotion's pitch survived AAC
    corrupt = next(r for r in rows if r["id"] == "test/dia999_utt0")
    with pytest.raises(AudioDecodeError) as err:
        decode_audio(corrupt["audio_path"])
    assert err.value.reason == "undecodable"
