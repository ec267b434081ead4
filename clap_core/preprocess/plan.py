"""Planning `clap preprocess` work units without holding the rows in one process (no Ray here).

The plan is a pure function of the input and the config, computed in stages that each touch a
bounded part of the input; `pipelines/preprocess_plan.py` runs the stages as parallel Ray tasks:

    chunks = input_chunks(input_uri, cfg)               # byte ranges of JSONL, one tar each, or the whole input
    n = count_chunk(chunk, cfg)                         # 0. rows per chunk -> global row offsets, row total
    route_chunk(chunk, first, G, cfg) -> {group: [...]}  # 1. read + validate, route each row by a hash of its id
    resolve_group(staged, offsets, size, cfg)           # 2. per group: duplicates, env partners, unit of each row
    load_unit_rows(unit)                                # 3. a unit's rows, read back from its pieces

Stable hashing: h = blake2b(id) as a 64-bit integer. The planning group of a row is h * G >> 64
(G = ceil(rows / input.plan_group_rows)), so groups are consecutive ranges of h. A split's rows in
(h, row index) order are cut every rows-per-unit rows into its units; a group learns where its rows
of each split start in that order from the per-(group, split) counts of stage 1, so units have
exactly the configured size without a global sort. All rows with one id share a group, so duplicates
are resolved there by input order (the global row index; the first occurrence wins). Env partners
for the augmented copies of a speech clip are drawn by (seed, id, copy) from the env clips of the
same split in the same group: deterministic, never across splits, no global list of rows.

Staging format (owned here, inside the job's output, deleted when the job finishes):
    OUT/_plan/<plan id>/rows/c<chunk>-g<group>.parquet    stage 1: row_index, h, row (JSON)
    OUT/_plan/<plan id>/units/<split>/g<group>.parquet    stage 2: unit, h, row_index, row (JSON),
                                                           sorted by unit so a unit reads few row groups
Rows travel as JSON with escaped surrogates, so undecodable caption bytes survive until rejected.
A unit's hash is a hash of its pieces' exact rows; the job hash a hash of the unit hashes.
"""
from __future__ import annotations

import hashlib
import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from clap_core import storage
from clap_core.audio.augment import pair_speech_with_env, stable_seed
from clap_core.data.inputs import decode_text, jsonl_block_rows, read_manifest, resolve_input, webdataset_rows
from clap_core.preprocess.config import PreprocessConfig
from clap_core.preprocess.unit import check_row, printable

STAGED_SCHEMA = pa.schema([("row_index", pa.int64()), ("h", pa.uint64()), ("row", pa.string())])
UNIT_SCHEMA = pa.schema([("unit", pa.int32()), ("h", pa.uint64()), ("row_index", pa.int64()), ("row", pa.string())])
STAGED_ROW_GROUP = 2048  # rows per Parquet row group of a group file: a unit reads only the groups it needs


# -------------------------------------------------------------------------------------------------
# input chunks


def input_chunks(input_uri: str, cfg: PreprocessConfig, chunk_mb: float) -> list[dict]:
    """Pieces of the input that tasks read independently, in input order. JSONL files are cut into byte
    ranges of about chunk_mb (lines belong to the range they start in); each tar is one chunk; a CSV
    or sidecar folder is one chunk (its rows are grouped across lines, e.g. AudioCaps)."""
    kind, files = resolve_input(input_uri)
    if kind == "jsonl" and "\n".encode(cfg.input.encoding) == b"\n":
        chunks = []
        for uri in files:
            size = storage.file_size(uri)
            step = max(1, int(chunk_mb * 1e6))
            chunks += [{"kind": "jsonl", "uri": uri, "start": s, "end": min(s + step, size), "size": size}
                       for s in range(0, max(size, 1), step)]
        return chunks
    if kind == "tar":
        return [{"kind": "tar", "uri": uri} for uri in files]
    return [{"kind": "whole", "uri": input_uri}]


def input_fingerprint(input_uri: str) -> str:
    """Hash of the input files' names, sizes and modification times: a changed input is planned again."""
    kind, files = resolve_input(input_uri)
    if kind == "sidecar":
        files = storage.list_files(files[0])
    fs, _ = storage.resolve_fs(input_uri)
    infos = fs.get_file_info([storage.resolve_fs(f)[1] for f in files])
    return hashlib.sha256(json.dumps([[i.path, i.size, i.mtime_ns] for i in infos]).encode()).hexdigest()[:16]


def line_block(uri: str, start: int, end: int, size: int) -> bytes:
    """The bytes of the lines of a file that start in [start, end)."""
    head = start
    if start > 0:
        probe = storage.read_range(uri, start - 1, end - start + 1)
        newline = probe.find(b"\n")
        if newline < 0:
            return b""  # one line runs through the whole range: it belongs to an earlier chunk
        head = start + newline
    if head >= end:
        return b""
    data, pos = storage.read_range(uri, head, end - head), end
    while not data.endswith(b"\n") and pos < size:  # finish the last line
        more = storage.read_range(uri, pos, min(1 << 16, size - pos))
        cut = more.find(b"\n")
        data += more if cut < 0 else more[:cut + 1]
        pos = size if cut >= 0 else pos + len(more)
    return data


def read_chunk(chunk: dict, first_index: int, cfg: PreprocessConfig) -> list[dict]:
    """Manifest rows of one chunk (clap_core.data.inputs format), numbered from first_index."""
    enc = cfg.input.encoding
    if chunk["kind"] == "jsonl":
        data = line_block(chunk["uri"], chunk["start"], chunk["end"], chunk["size"])
        return jsonl_block_rows(data, chunk["uri"], enc, first_index, chunk.get("first_line", 1))
    if chunk["kind"] == "tar":
        return webdataset_rows(chunk["uri"], first_index, enc)
    return read_manifest(chunk["uri"], enc, cfg.input.audio_dir)


def count_chunk(chunk: dict, cfg: PreprocessConfig) -> int:
    return count_lines(chunk, cfg)[0]


def count_lines(chunk: dict, cfg: PreprocessConfig) -> tuple[int, int]:
    """(rows, newline bytes) of a chunk; JSONL lines are counted without parsing them, by the rule of
    jsonl_block_rows (newline bytes only; blank lines are no rows)."""
    if chunk["kind"] == "jsonl":
        data = line_block(chunk["uri"], chunk["start"], chunk["end"], chunk["size"])
        enc = cfg.input.encoding
        rows = sum(1 for i, raw in enumerate(data.split(b"\n")) if
                   (decode_text(raw, enc) if i == 0 and chunk["start"] == 0 else
                    raw.decode(enc, errors="surrogateescape")).strip())
        return rows, data.count(b"\n")
    return len(read_chunk(chunk, 0, cfg)), 0


# -------------------------------------------------------------------------------------------------
# stage 1: validate and route (per chunk)


def id_hash(row_id: str) -> int:
    return stable_seed(printable(row_id))


def slot(h: int, n: int) -> int:
    """Which of n equal ranges of the 64-bit hash space h falls in (monotone in h)."""
    return (h * n) >> 64


def group_count(rows_in: int, cfg: PreprocessConfig) -> int:
    return max(1, math.ceil(rows_in / cfg.input.plan_group_rows))


def route_rows(rows: list[dict], groups: int, cfg: PreprocessConfig) -> tuple[dict[int, list[tuple]], dict[int, dict[str, int]]]:
    """Validated rows by planning group as (row_index, h, row), and rows per (group, split)."""
    out: dict[int, list[tuple]] = {}
    counts: dict[int, dict[str, int]] = {}
    for raw in rows:
        row, problem = check_row(raw, cfg)
        row["planned_reject"] = None if problem is None else {"stage": "read_manifest", "reason": problem[0],
                                                              "detail": problem[1]}
        row.pop("error", None)
        h = id_hash(row["id"])
        g = slot(h, groups)
        out.setdefault(g, []).append((row["row_index"], h, row))
        counts.setdefault(g, {})[row["split"]] = counts.setdefault(g, {}).get(row["split"], 0) + 1
    return out, counts


def merge_counts(parts: list[dict[int, dict[str, int]]]) -> dict[int, dict[str, int]]:
    total: dict[int, dict[str, int]] = {}
    for part in parts:
        for g, by_split in part.items():
            for split, n in by_split.items():
                total.setdefault(int(g), {})[split] = total.setdefault(int(g), {}).get(split, 0) + n
    return total


# -------------------------------------------------------------------------------------------------
# stage 2: resolve one group


def split_layout(counts: dict[int, dict[str, int]], size: int) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    """(units per split, {group: {split: rows of the split in earlier groups}}). A split's rows in hash
    order are cut every `size` rows; groups are consecutive hash ranges, so a group knows where its rows
    of each split start in that order from the counts alone."""
    totals: dict[str, int] = {}
    offsets: dict[int, dict[str, int]] = {}
    for g in sorted(counts):
        offsets[g] = dict(totals)
        for split, n in counts[g].items():
            totals[split] = totals.get(split, 0) + n
    return {s: max(1, math.ceil(n / size)) for s, n in sorted(totals.items())}, offsets


def env_partners(rows: list[dict], cfg: PreprocessConfig) -> None:
    """Set row["env_partners"] = {copy: env row} for accepted speech rows, from env rows of the same split."""
    aug = cfg.augment
    for row in rows:
        row["env_partners"] = {}
    if not (aug.copies and aug.mix_prob > 0):
        return
    accepted = [r for r in rows if r["planned_reject"] is None]
    for split in sorted({r["split"] for r in accepted} & set(aug.splits)):  # only augmented splits get copies
        env = {r["id"]: r for r in accepted if r["kind"] == "env" and r["split"] == split}
        speech = [r for r in accepted if r["kind"] == "speech" and r["split"] == split]
        if not (env and speech):
            continue
        keys = [f"{r['id']}#aug{k}" for r in speech for k in range(1, aug.copies + 1)]
        by_id = {r["id"]: r for r in speech}
        for key, env_id in pair_speech_with_env(keys, list(env), aug.seed):
            speech_id, k = key.rsplit("#aug", 1)
            e = env[env_id]
            by_id[speech_id]["env_partners"][k] = {
                "id": env_id, "audio_uri": e["audio_uri"], "byte_offset": e["byte_offset"],
                "byte_size": e["byte_size"], "source_path": e["source_path"], "caption": e["caption"]}


def resolve_group(staged: list[tuple], offsets: dict[str, int], size: int,
                  cfg: PreprocessConfig) -> dict[tuple[str, int], list[tuple]]:
    """(row_index, h, row) of one group -> {(split, unit): [(h, row_index, row), ...] in unit order}.
    Duplicate ids: the first occurrence in input order is kept, later ones are rejected."""
    staged = sorted(staged, key=lambda t: t[0])
    seen: set[str] = set()
    for _, _, row in staged:
        if row["planned_reject"] is None and row["id"] in seen:
            row["planned_reject"] = {"stage": "read_manifest", "reason": "duplicate_id",
                                     "detail": f"id {printable(row['id'])!r} appeared earlier in the input"}
        elif row["planned_reject"] is None:
            seen.add(row["id"])
    env_partners([row for _, _, row in staged], cfg)
    out: dict[tuple[str, int], list[tuple]] = {}
    position = dict(offsets)
    for row_index, h, row in sorted(staged, key=lambda t: (t[1], t[0])):
        n = position.get(row["split"], 0)
        position[row["split"]] = n + 1
        out.setdefault((row["split"], n // size), []).append((h, row_index, row))
    return dict(sorted(out.items()))


def row_json(row: dict) -> str:
    return json.dumps(row, sort_keys=True)  # ASCII: lone surrogates (undecodable bytes) are escaped


def piece_hash(rows_json: list[str]) -> str:
    return hashlib.sha256("\n".join(rows_json).encode()).hexdigest()[:16]


def unit_hash(job: dict, key: str, piece_hashes: list[str]) -> str:
    return hashlib.sha256(json.dumps([job, key, piece_hashes], sort_keys=True).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------
# staging files


def parquet_bytes(table: pa.Table, row_group: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group, compression="zstd")
    return buf.getvalue()


def write_staged(uri: str, staged: list[tuple]) -> None:
    cols = list(zip(*staged)) if staged else [[], [], []]
    table = pa.table([pa.array(cols[0], pa.int64()), pa.array(cols[1], pa.uint64()),
                      pa.array([row_json(r) for r in cols[2]], pa.string())], schema=STAGED_SCHEMA)
    storage.put_atomic(uri, parquet_bytes(table, 65_536))


def read_staged(uris: list[str]) -> list[tuple]:
    out = []
    for uri in uris:
        t = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        out += [(i, h, json.loads(r)) for i, h, r in zip(*(t.column(c).to_pylist() for c in ("row_index", "h", "row")))]
    return out


def write_unit_file(uri: str, pieces: dict[int, list[tuple]]) -> dict[int, dict]:
    """One split's pieces of one group, sorted by unit; returns {unit: {rows, rejects, hash}}."""
    units, sorts, indexes, rows, info = [], [], [], [], {}
    for unit in sorted(pieces):
        texts = [row_json(r) for _, _, r in pieces[unit]]
        info[unit] = {"rows": len(texts), "hash": piece_hash(texts),
                      "rejects": sum(r["planned_reject"] is not None for _, _, r in pieces[unit])}
        units += [unit] * len(texts)
        sorts += [s for s, _, _ in pieces[unit]]
        indexes += [i for _, i, _ in pieces[unit]]
        rows += texts
    table = pa.table([pa.array(units, pa.int32()), pa.array(sorts, pa.uint64()), pa.array(indexes, pa.int64()),
                      pa.array(rows, pa.string())], schema=UNIT_SCHEMA)
    storage.put_atomic(uri, parquet_bytes(table, STAGED_ROW_GROUP))
    return info


def load_unit_rows(unit: dict) -> list[dict]:
    """A unit's planned rows from its pieces (reads only the row groups that can hold the unit)."""
    found = []
    for uri in unit["pieces"]:
        fs, path = storage.resolve_fs(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                stats = pf.metadata.row_group(g).column(0).statistics
                if stats is not None and stats.has_min_max and not stats.min <= unit["index"] <= stats.max:
                    continue
                t = pf.read_row_group(g)
                found += [(s, i, r) for u, s, i, r in zip(*(t.column(c).to_pylist() for c in UNIT_SCHEMA.names))
                          if u == unit["index"]]
    found.sort(key=lambda t: (t[0], t[1]))
    return [json.loads(r) for _, _, r in found]
