"""The staged plan of `clap preprocess`: planned rows parked in the job's output between planning stages.
This module is the one writer and reader of these files (clap_core.preprocess.plan makes their content):

    OUT/_plan/<plan id>/rows/c<chunk>-g<group>.parquet    stage 1: row_index, h, row (JSON)
    OUT/_plan/<plan id>/units/<split>/g<group>.parquet    stage 2: unit, h, row_index, row (JSON),
                                                           sorted by unit so a unit reads few row groups
    OUT/_plan/<plan id>/plan.json                         the plan (pipelines/preprocess_plan.py)

Rows travel as JSON with escaped surrogates, so undecodable caption bytes survive until rejected. A
piece's hash is a hash of its rows' exact JSON text: the unit hashes (and so resume) depend on it.
Staged rows are deleted when the job finishes (`drop_staging`); plan.json stays.
"""
from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from clap_core import storage

PLAN_DIR = "_plan"  # OUT/_plan/<plan id>/
PLAN_FILE = "plan.json"  # OUT/_plan/<plan id>/plan.json
STAGED_SCHEMA = pa.schema([("row_index", pa.int64()), ("h", pa.uint64()), ("row", pa.string())])
UNIT_SCHEMA = pa.schema([("unit", pa.int32()), ("h", pa.uint64()), ("row_index", pa.int64()), ("row", pa.string())])
STAGED_ROW_GROUP = 2048  # rows per Parquet row group of a group file: a unit reads only the groups it needs


def plan_root(out_uri: str, plan_id: str) -> str:
    return storage.join(out_uri, PLAN_DIR, plan_id)


def routed_file(root: str, chunk: int, group: int) -> str:
    """Stage 1 output: the rows of one input chunk that fall in one planning group."""
    return storage.join(root, "rows", f"c{chunk:05d}-g{group:05d}.parquet")


def unit_file(root: str, split: str, group: int) -> str:
    """Stage 2 output: one group's pieces of the units of one split."""
    return storage.join(root, "units", split, f"g{group:05d}.parquet")


def row_json(row: dict) -> str:
    return json.dumps(row, sort_keys=True)  # ASCII: lone surrogates (undecodable bytes) are escaped


def piece_hash(rows_json: list[str]) -> str:
    return hashlib.sha256("\n".join(rows_json).encode()).hexdigest()[:16]


def parquet_bytes(table: pa.Table, row_group: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group, compression="zstd")
    return buf.getvalue()


def write_staged(uri: str, staged: list[tuple]) -> None:
    """Stage 1: (row_index, h, row) tuples of one chunk and group."""
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
    """Stage 2: one split's pieces of one group, sorted by unit; returns {unit: {rows, rejects, hash}}."""
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


def load_unit_rows(pieces: list[str], index: int) -> list[dict]:
    """The planned rows of unit `index` from its pieces (reads only the row groups that can hold it)."""
    found = []
    for uri in pieces:
        fs, path = storage.resolve_fs(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                stats = pf.metadata.row_group(g).column(0).statistics
                if stats is not None and stats.has_min_max and not stats.min <= index <= stats.max:
                    continue
                t = pf.read_row_group(g)
                found += [(s, i, r) for u, s, i, r in zip(*(t.column(c).to_pylist() for c in UNIT_SCHEMA.names))
                          if u == index]
    found.sort(key=lambda t: (t[0], t[1]))
    return [json.loads(r) for _, _, r in found]


def write_plan_file(root: str, doc: dict) -> None:
    """plan.json: the commit point of planning (pipelines/preprocess_plan.py makes its content)."""
    storage.put_atomic(storage.join(root, PLAN_FILE), json.dumps(doc).encode())


def read_plan_file(root: str) -> dict | None:
    """plan.json of this plan id when the job was planned before, else None."""
    uri = storage.join(root, PLAN_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def drop_staging(root: str) -> None:
    """Delete the staged rows of a finished job (written by this job only); plan.json stays."""
    for uri in storage.list_files(root):
        if not uri.endswith("/" + PLAN_FILE):
            storage.delete(uri)
