"""Streaming planning without Ray: JSONL byte-range chunks read exactly like the whole file, the staged
(distributed) planner gives the same units and hashes as the in-memory one, and env-mix partners
never cross splits (in the plan and in the written shards)."""
from __future__ import annotations

import json

import pytest

import pipelines.preprocess_plan as plan_job_module
from clap_core.data import input_chunks as chunking
from clap_core.data.input_rows import new_row
from clap_core.data.inputs import read_inputs
from clap_core.preprocess import plan as planner
from clap_core.preprocess.config import load_preprocess_config
from clap_core.preprocess.plan import Plan, plan_units
from clap_core.preprocess.staging import load_unit_rows
from clap_core.preprocess.unit import process_unit
from clap_demo.synth import write_corpus

MESSY_JSONL = ("\ufeff" + json.dumps({"id": "a", "audio_path": "a.wav", "caption": "caf\u00e9 \u2028 x"},
                                  ensure_ascii=False) + "\r\n\n"
               + "not json\n" + "   \n"
               + "".join(json.dumps({"id": f"r{i}", "audio_path": f"{i}.wav", "caption": f"clip {i}"}) + "\n"
                         for i in range(40))
               + json.dumps({"audio_path": "", "caption": "no audio"}))  # no trailing newline


def chunked_rows(uri: str, cfg, chunk_mb: float) -> list[dict]:
    chunks = chunking.input_chunks(uri, chunk_mb, cfg.input.encoding)
    counted = [chunking.count_lines(c, cfg.input.encoding) for c in chunks]  # (rows, lines) of each chunk, once
    firsts = chunking.chunk_starts(chunks, counted)  # as pipelines/preprocess_plan.py: row offsets, first lines
    rows = []
    for chunk, (count, _), first in zip(chunks, counted, firsts):
        part = chunking.read_chunk(chunk, first, cfg.input.encoding)
        assert len(part) == count  # stage 0's count without parsing = the rows stage 1 reads
        rows += part
    return rows


@pytest.mark.parametrize("chunk_bytes", [3, 7, 50, 333, 10**6])  # every size cuts lines mid-way
def test_jsonl_byte_range_chunks_read_like_the_whole_file(tmp_path, chunk_bytes):
    path = tmp_path / "m.jsonl"
    path.write_text(MESSY_JSONL, encoding="utf-8")
    cfg = load_preprocess_config()
    whole = read_inputs(str(path))
    assert len(whole) == 43 and whole[1]["error"][1].startswith("line 3:")  # U+2028 stays inside its line
    assert chunked_rows(str(path), cfg, chunk_bytes / 1e6) == whole


MESSY_CSV = ("\ufeffid,audio_path,caption,caption_2\r\n"
             + 'q1,q1.wav,"a quoted caption\nover two lines",second\r\n'
             + 'q2,q2.wav,"says ""hi"", then\r\n\r\nleaves",\n'  # escaped quotes, a blank line inside quotes
             + 's1,s1.wav,a 12" record and a 7" one,x\n'  # a quote inside an unquoted field is text
             + "\n,\n"  # a blank line, then a row with no audio
             + "r1,r1.wav,too,many,fields\n"  # ragged
             + "m1,m1.wav,old mac line\rm2,m2.wav,ends,\r"  # lone \r line ends
             + "v1,v1.wav,vt\x0bff\x0cls\u2028nel\x85,\n"  # line ends for str.splitlines, not for csv
             + "".join(f'c{i},{i}.wav,"clip {i}, caf\u00e9",\n' for i in range(30))
             + 'last,last.wav,"no trailing newline",')


@pytest.mark.parametrize("chunk_bytes", [3, 7, 50, 333])  # every size would cut records and quoted fields apart
@pytest.mark.parametrize("block_bytes", [5, 1 << 20])  # the readers' block: lines longer than it, \r\n across it
def test_csv_chunks_end_where_records_end_and_read_like_the_whole_file(tmp_path, monkeypatch, chunk_bytes,
                                                                       block_bytes):
    from clap_core.data import input_tables

    monkeypatch.setattr(input_tables, "CSV_BLOCK_BYTES", block_bytes)
    path = tmp_path / "m.csv"
    path.write_bytes(MESSY_CSV.encode("utf-8"))
    cfg = load_preprocess_config()
    whole = read_inputs(str(path))
    assert [r["id"] for r in whole[:4]] == ["q1", "q2", "s1", None] and len(whole) == 39
    assert whole[0]["captions"] == ["a quoted caption\nover two lines", "second"]
    assert whole[1]["captions"] == ['says "hi", then\r\n\r\nleaves']
    assert whole[2]["captions"] == ['a 12" record and a 7" one', "x"]
    assert whole[4]["error"] == ("ragged_row", "line 10 has 5 fields, the header 4")  # lines as csv counts them
    assert [r["id"] for r in whole[5:7]] == ["m1", "m2"] and whole[-1]["captions"] == ["no trailing newline"]
    assert whole[7]["captions"] == ["vt\x0bff\x0cls\u2028nel\x85"]
    chunks = chunking.input_chunks(str(path), chunk_bytes / 1e6, cfg.input.encoding)
    assert len(chunks) >= min(30, 1100 // chunk_bytes // 2) and {c["kind"] for c in chunks} == {"csv"}
    assert chunked_rows(str(path), cfg, chunk_bytes / 1e6) == whole


def test_a_transient_error_while_cutting_a_csv_scans_it_again(tmp_path, monkeypatch):
    """The driver's one parse of a big CSV reads it a block at a time: a reset connection mid-way is retried (the
    scan again from the start), never a verdict on the file; the cuts are those of a scan without faults."""
    import functools

    from clap_core import io_faults
    from clap_core.data import input_tables

    monkeypatch.setattr(input_tables, "CSV_BLOCK_BYTES", 64)
    path = tmp_path / "m.csv"
    path.write_bytes(MESSY_CSV.encode("utf-8"))
    expected = chunking.input_chunks(str(path), 100 / 1e6)
    monkeypatch.setattr(chunking, "retry_transient", functools.partial(io_faults.retry_transient, sleep=lambda s: None))
    real, calls = input_tables.storage.read_range, []

    def flaky(uri, offset, size):
        calls.append(offset)
        if len(calls) == 5:
            raise ConnectionResetError(104, "connection reset by peer")
        return real(uri, offset, size)

    monkeypatch.setattr(input_tables.storage, "read_range", flaky)
    assert chunking.input_chunks(str(path), 100 / 1e6) == expected and len(expected) > 5
    assert calls[:4] == calls[5:9] and calls.count(0) == 2  # read again from the start, once


def test_small_and_grouped_csvs_stay_one_chunk(tmp_path):
    audiocaps = tmp_path / "train.csv"
    audiocaps.write_text("audiocap_id,youtube_id,start_time,caption\n"
                         + "".join(f"{i},yt{i % 3},0,caption {i}\n" for i in range(30)))  # a clip's rows far apart
    generic = tmp_path / "g.csv"
    generic.write_text("audio_path,caption\n" + "".join(f"{i}.wav,c{i}\n" for i in range(30)))
    cfg = load_preprocess_config()
    assert [c["kind"] for c in chunking.input_chunks(str(audiocaps), 50 / 1e6)] == ["whole"]
    assert len(chunked_rows(str(audiocaps), cfg, 50 / 1e6)) == 3  # grouped per youtube_id, as a whole read
    assert [c["kind"] for c in chunking.input_chunks(str(generic), 1.0)] == ["whole"]  # under chunk_mb: as before
    assert chunked_rows(str(generic), cfg, 50 / 1e6) == read_inputs(str(generic))


def test_folder_of_manifest_parts_numbers_rows_across_parts(tmp_path):
    for part in range(3):
        (tmp_path / f"part-{part}.jsonl").write_text("".join(
            json.dumps({"id": f"p{part}-{i}", "audio_path": f"{i}.wav", "caption": "c"}) + "\n" for i in range(5)))
    rows = read_inputs(str(tmp_path))
    assert [r["row_index"] for r in rows] == list(range(15)) and rows[5]["id"] == "p1-0"
    assert chunked_rows(str(tmp_path), load_preprocess_config(), 30 / 1e6) == rows



def test_a_sidecar_folder_is_counted_from_its_listing_and_its_sidecars_read_once(tmp_path, monkeypatch):
    """Planning counts a sidecar folder's rows (stage 0) from the listing: each sidecar (a request on S3) is
    read once, by stage 1, and the rows equal a whole read."""
    from clap_core.data import input_folders

    for i in range(6):
        (tmp_path / f"{i}.wav").write_bytes(b"RIFF")
        if i != 4:
            (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    rows = read_inputs(str(tmp_path))
    real, reads = input_folders.storage.read_bytes, []
    monkeypatch.setattr(input_folders.storage, "read_bytes", lambda uri: reads.append(uri) or real(uri))
    assert chunked_rows(str(tmp_path), load_preprocess_config(), 1.0) == rows
    assert sorted(reads) == sorted(str(tmp_path / f"{i}.txt") for i in (0, 1, 2, 3, 5))  # once each

@pytest.mark.parametrize("clips_per_chunk", [1, 2, 3, 100])
def test_a_sidecar_folder_is_cut_into_chunks_read_like_the_whole_folder(tmp_path, monkeypatch, clips_per_chunk):
    """A sidecar folder is listed once and cut into parts of SIDECAR_CHUNK_CLIPS audio files, each carrying its
    sidecars (none read twice, the folder never listed again by a task): the rows, their numbers and their
    rejects are the whole read's."""
    import os

    from clap_core.data import input_folders

    (tmp_path / "sub").mkdir()
    for i in range(7):
        folder = tmp_path / ("sub" if i % 3 == 0 else "")
        (folder / f"{i}.wav").write_bytes(b"RIFF")
        if i == 2:
            (folder / f"{i}.json").write_text(json.dumps({"caption": "json caption", "split": "valid"}))
        elif i == 5:
            (folder / f"{i}.txt").write_bytes(b"\xff\xfe bad")  # rejected later as caption_not_utf8
        elif i != 4:  # 4: missing_caption
            (folder / f"{i}.txt").write_text(f"caption {i}\nsecond {i}")
    os.mkfifo(tmp_path / "fifo.wav")  # never opened: a not_regular row
    (tmp_path / "loose.txt").write_text("a sidecar with no audio")
    rows = read_inputs(str(tmp_path))
    assert len(rows) == 8 and [r["row_index"] for r in rows] == list(range(8))
    monkeypatch.setattr(input_folders, "SIDECAR_CHUNK_CLIPS", clips_per_chunk)
    listings = []
    real_entries = input_folders.folder_entries
    monkeypatch.setattr(input_folders, "folder_entries",
                        lambda root, listing=None: listings.append(root) or real_entries(root, listing))
    chunks = chunking.input_chunks(str(tmp_path), 1.0)
    assert len(chunks) == -(-8 // clips_per_chunk) and listings == [str(tmp_path)]
    json.loads(json.dumps(chunks))  # chunks travel to Ray tasks as JSON
    real_read, reads = input_folders.storage.read_bytes, []
    monkeypatch.setattr(input_folders.storage, "read_bytes", lambda uri: reads.append(uri) or real_read(uri))
    assert chunked_rows(str(tmp_path), load_preprocess_config(), 1.0) == rows
    assert listings == [str(tmp_path)] * 2  # input_chunks, called again by chunked_rows; no task lists it
    assert len(reads) == len(set(reads)) == 6  # the sidecars of clips 0-3, 5 and 6, once each; loose.txt never


def serial_tasks(fn, items, num_cpus):
    """run_tasks without Ray: the same JSON round trips, one item after another."""
    return [json.loads(json.dumps(fn(json.loads(json.dumps(item))))) for item in items]


def mixed_rows(n: int) -> list[dict]:
    """Speech and env clips in two splits, with duplicate ids across splits and a bad row."""
    rows = [new_row(i, f"{i}.wav", f"/x/{i}.wav", [f"clip {i}"], id=f"id{i % (n - 7)}",
                    split="train" if i % 3 else "valid", kind="speech" if i % 2 else "env") for i in range(n)]
    rows.append(new_row(n, "", None, ["x"], error=("missing_audio_path", "row has no audio_path")))
    return rows


def test_staged_plan_equals_in_memory_plan(tmp_path, monkeypatch):
    rows = mixed_rows(120)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "audio_path": r["source_path"], "caption": r["caption"],
                                            "split": r["split"], "kind": r["kind"]}) + "\n" for r in rows))
    overrides = ["output.rows_per_unit=9", "input.plan_group_rows=25", "ray.plan_chunk_mb=0.0015",
                 "augment.copies=2"]
    cfg = load_preprocess_config(None, overrides)
    monkeypatch.setattr(plan_job_module, "run_tasks", serial_tasks)
    plan, root = plan_job_module.plan_job(str(manifest), str(tmp_path / "out"), cfg)
    memory = plan_units(read_inputs(str(manifest)), cfg)

    assert len(chunking.input_chunks(str(manifest), cfg.ray.plan_chunk_mb)) > 3  # really chunked
    assert planner.group_count(plan.rows_in, cfg) == 5  # and really grouped
    assert [u.key for u in plan.units] == [u.key for u in memory.units]
    assert [u.hash for u in plan.units] == [u.hash for u in memory.units]
    assert plan.job_hash == memory.job_hash and plan.rows_in == memory.rows_in == 121
    assert plan.planned_rejects == memory.planned_rejects == 8  # 7 duplicate ids + the row without audio
    for unit, expected in zip(plan.units, memory.units):
        assert load_unit_rows(unit.pieces, unit.index) == expected.rows
        assert unit.size == len(expected.rows) and unit.rows is None  # rows stay in the pieces
    sizes = {s: [len(u.rows) for u in memory.units if u.split == s] for s in ("train", "valid")}
    assert all(n == 9 for s in sizes for n in sizes[s][:-1])  # exact unit size, the last one takes the rest
    again, _ = plan_job_module.plan_job(str(manifest), str(tmp_path / "out"), cfg)  # read back from plan.json
    assert again == plan == Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert list(plan.to_dict()["units"][0]) == ["key", "split", "index", "pieces", "size", "hash"]  # plan.json as before


def test_duplicates_resolved_by_input_order_in_any_group():
    rows = mixed_rows(60)
    cfg = load_preprocess_config(None, ["input.plan_group_rows=7"])
    planned = {r["row_index"]: r for u in plan_units(rows, cfg).units for r in u.rows}
    first_seen = {}
    for i in range(60):
        first_seen.setdefault(rows[i]["id"], i)
    for i in range(60):
        reason = (planned[i]["planned_reject"] or {}).get("reason")
        assert reason == (None if first_seen[rows[i]["id"]] == i else "duplicate_id"), i


def test_env_partners_come_from_the_same_split():
    rows = mixed_rows(200)
    for groups in ("1000", "40"):
        cfg = load_preprocess_config(None, ["augment.copies=3", "augment.splits=[train, valid]",
                                            f"input.plan_group_rows={groups}"])
        planned = [r for u in plan_units(rows, cfg).units for r in u.rows]
        env_split = {r["id"]: r["split"] for r in planned if r["kind"] == "env" and not r["planned_reject"]}
        mixed = [(r["split"], p["id"]) for r in planned for p in r["env_partners"].values()]
        assert len(mixed) > 100 and {env_split[e] for _, e in mixed} == {"train", "valid"}
        assert all(env_split[e] == split for split, e in mixed)


def test_every_env_id_in_a_split_names_a_clip_of_that_split(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", 24, seed=11, formats=("wav",), seconds=(0.6, 0.7))
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, r in enumerate(lines):  # speech and env in both splits
        r["split"], r["kind"] = ("train", "valid")[i % 2], ("speech", "speech", "env")[i % 3]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_preprocess_config(None, ["augment.copies=2", "augment.splits=[train, valid]", "output.rows_per_unit=6"])
    out = str(tmp_path / "out")
    for unit in plan_units(read_inputs(str(manifest)), cfg).units:
        process_unit(unit, cfg, out)
    shards = read_shards_from_folder(out)
    split_of = {r["id"]: r["split"] for r in lines}
    env_ids = [(r["split"], json.loads(r["augment"])["env_mix"]["env_id"]) for r in shards
               if "env_mix" in json.loads(r["augment"])]
    assert len(env_ids) >= 8 and {s for s, _ in env_ids} == {"train", "valid"}
    assert all(split_of[env_id] == split for split, env_id in env_ids)


def read_shards_from_folder(out: str) -> list[dict]:
    """Rows of every shard a unit wrote (no manifest.json: units were run by hand)."""
    import glob

    import pyarrow.parquet as pq

    return [r for f in sorted(glob.glob(f"{out}/*/part-*.parquet")) if "/_rejects/" not in f
            for r in pq.read_table(f).to_pylist()]

