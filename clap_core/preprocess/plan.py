"""Planning `clap preprocess`: input rows -> work units, a pure function of the input and the config
(no Ray here). The records it hands on: `Plan` (the job) and `Unit` (what one worker processes).

    plan = plan_units(read_inputs(path), cfg)           # in memory, in this process (tests, benchmarks)

The job plans without holding the rows in one process: `pipelines/preprocess_plan.py` runs the same
stages as parallel Ray tasks, each touching a bounded part of the input, and both give the same
units and hashes:

    chunks = input_chunks(input_uri, chunk_mb, enc)     # clap_core.data.input_chunks: JSONL byte ranges, tars, ...
    firsts = chunk_starts(chunks, [count_lines(c, enc, audio_dir) for c in chunks])  # 0. rows per chunk -> row offsets
    route_rows(read_chunk(chunk, first, enc, audio_dir), G, cfg)  # 1. validate (check_row), route each row by a hash of its id
    resolve_group(staged, offsets, size, cfg)           # 2. per group: duplicates, env partners, unit of each row
    assemble_plan(resolved, units_per_split, rows, cfg) # the driver: units from the groups' piece summaries

Stable hashing: h = blake2b(id) as a 64-bit integer. The planning group of a row is h * G >> 64
(G = ceil(rows / input.plan_group_rows)), so groups are consecutive ranges of h. A split's rows in
(h, row index) order are cut every rows-per-unit rows into its units; a group learns where its rows
of each split start in that order from the per-(group, split) counts of stage 1, so units have
exactly the configured size without a global sort. All rows with one id share a group, so duplicates
are resolved there by input order (the global row index; the first occurrence wins). Env partners
for the augmented copies of a speech clip are drawn by (seed, id, copy) from the env clips of the
same split in the same group: deterministic, never across splits, no global list of rows.

Between stages the rows are staged in the job's output (clap_core.preprocess.staging owns those
files). A unit's hash is a hash of its pieces' exact rows and the job config; the job hash a hash of
the unit hashes: a marker with another unit hash belongs to another job (resume refuses it).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from clap_core import storage
from clap_core.audio.augment import pair_speech_with_env, stable_seed
from clap_core.config import to_dict
from clap_core.data.input_rows import InputRow
from clap_core.data.inputs import ResolvedInput, resolve_input
from clap_core.data.rejects import printable
from clap_core.data.shards import unit_key
from clap_core.preprocess.config import PreprocessConfig
from clap_core.preprocess.rows import PlannedRow, check_row
from clap_core.preprocess.staging import piece_hash, row_json

FLAC_RATIO = 0.6  # typical FLAC size / PCM size, to size units from shard_mb


# -------------------------------------------------------------------------------------------------
# records


@dataclass
class Unit:
    """One work unit: the rows of one split that one worker turns into shards, a rejects file and a marker."""

    key: str  # "<split>-<n:05d>" (clap_core.data.shards.unit_key): names its marker
    split: str
    index: int  # n: its shards are <split>/part-<n>-<k>.parquet
    hash: str  # its exact rows + the job config (resume refuses a marker with another hash)
    pieces: list[str] = field(default_factory=list)  # staged files holding its rows (the distributed plan)
    size: int = 0  # rows in those pieces
    rows: list[PlannedRow] | None = None  # its planned rows, once loaded (in-memory plans: from the start)

    def to_dict(self) -> dict:
        """What crosses Ray Data and plan.json: rows never travel, a worker loads them from the pieces."""
        return {"key": self.key, "split": self.split, "index": self.index, "pieces": self.pieces, "size": self.size,
                "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        return cls(key=d["key"], split=d["split"], index=d["index"], hash=d["hash"], pieces=list(d["pieces"]),
                   size=d["size"])


@dataclass
class Plan:
    units: list[Unit]  # every split's units in split and index order
    rows_in: int  # input rows
    planned_rejects: int  # rows rejected while planning (stage read_manifest)
    job_hash: str  # hash of the job config and every unit hash: identifies a finished output

    def to_dict(self) -> dict:
        return {"rows_in": self.rows_in, "planned_rejects": self.planned_rejects, "job_hash": self.job_hash,
                "units": [u.to_dict() for u in self.units]}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(units=[Unit.from_dict(u) for u in d["units"]], rows_in=d["rows_in"],
                   planned_rejects=d["planned_rejects"], job_hash=d["job_hash"])

    def unit_hashes(self) -> dict[str, str]:
        """unit key -> unit hash (clap_core.data.markers.check_markers)."""
        return {u.key: u.hash for u in self.units}


def rows_per_unit(cfg: PreprocessConfig) -> int:
    """Input rows per unit so that one unit fills about one shard of output.shard_mb."""
    if cfg.output.rows_per_unit:
        return cfg.output.rows_per_unit
    bytes_per_sample = 2 if cfg.output.flac_subtype == "PCM_16" else 3
    row_mb = cfg.output.expected_clip_seconds * cfg.audio.target_sr * bytes_per_sample * FLAC_RATIO / 1e6
    return max(1, int(cfg.output.shard_mb / (row_mb * (cfg.augment.copies + 1))))


def job_config(cfg: PreprocessConfig) -> dict:
    """The part of the config that decides the output (parallelism and debug settings do not)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("ray", "debug")}


def content_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def unit_hash(job: dict, key: str, piece_hashes: list[str]) -> str:
    return hashlib.sha256(json.dumps([job, key, piece_hashes], sort_keys=True).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------
# input fingerprint


def input_fingerprint(input_uri: str, resolved: ResolvedInput | None = None) -> str:
    """Hash of the input files' names, sizes and modification times: a changed input is planned again. A folder's
    come from its listing (resolve_input's, reused when the caller passes it): no request per file."""
    kind, files, listing = resolved or resolve_input(input_uri)
    if listing is None:  # one manifest or tar: its own stat
        fs, _ = storage.resolve_fs(input_uri)
        stats = [(i.path, i.size, i.mtime_ns) for i in fs.get_file_info([storage.resolve_fs(f)[1] for f in files])]
    else:  # a sidecar folder: every file in it; a folder of tars or manifest parts: those
        read = None if kind == "sidecar" else set(files)
        stats = [tuple(stat) for stat in listing if read is None or stat.uri in read]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------
# stage 1: validate and route (per chunk)


def id_hash(row_id: str) -> int:
    return stable_seed(printable(row_id))


def slot(h: int, n: int) -> int:
    """Which of n equal ranges of the 64-bit hash space h falls in (monotone in h)."""
    return (h * n) >> 64


def group_count(rows_in: int, cfg: PreprocessConfig) -> int:
    return max(1, math.ceil(rows_in / cfg.input.plan_group_rows))


def route_rows(rows: list[InputRow], groups: int, cfg: PreprocessConfig) -> tuple[dict[int, list[tuple]], dict[int, dict[str, int]]]:
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


# -------------------------------------------------------------------------------------------------
# the plan


def assemble_plan(resolved: list[dict], units_per_split: dict[str, int], rows_in: int, cfg: PreprocessConfig) -> Plan:
    """Units from the groups' piece summaries ({split: {"uri", "units": {n: {rows, rejects, hash}}}} per group,
    in group order, which is hash order)."""
    pieces: dict[tuple[str, int], list[tuple[str, dict]]] = {}
    for info in resolved:
        for split, entry in info.items():
            for n, piece in entry["units"].items():
                pieces.setdefault((split, int(n)), []).append((entry["uri"], piece))
    job, units = job_config(cfg), []
    for split, n_units in units_per_split.items():
        for n in range(n_units):
            parts = pieces.get((split, n), [])
            key = unit_key(split, n)
            units.append(Unit(key=key, split=split, index=n, pieces=[uri for uri, _ in parts],
                              size=sum(p["rows"] for _, p in parts),
                              hash=unit_hash(job, key, [p["hash"] for _, p in parts])))
    rejects = sum(p["rejects"] for parts in pieces.values() for _, p in parts)
    return Plan(units=units, rows_in=rows_in, planned_rejects=rejects,
                job_hash=content_hash([job, [u.hash for u in units]]))


def plan_units(rows: list[InputRow], cfg: PreprocessConfig) -> Plan:
    """The plan of an input held in memory: the stages of the distributed planner run in this process,
    so both give the same units and hashes; each unit carries its rows."""
    routed, counts = route_rows(rows, group_count(len(rows), cfg), cfg)
    size = rows_per_unit(cfg)
    units_per_split, offsets = split_layout(counts, size)
    pieces: dict[tuple[str, int], list[list[dict]]] = {}
    for g in sorted(routed):
        for key, piece in resolve_group(routed[g], offsets[g], size, cfg).items():
            pieces.setdefault(key, []).append([r for _, _, r in piece])
    job, units = job_config(cfg), []
    for split, n_units in units_per_split.items():
        for n in range(n_units):
            parts = pieces.get((split, n), [])
            key = unit_key(split, n)
            hashes = [piece_hash([row_json(r) for r in part]) for part in parts]
            unit_rows = [r for part in parts for r in part]
            units.append(Unit(key=key, split=split, index=n, size=len(unit_rows), rows=unit_rows,
                              hash=unit_hash(job, key, hashes)))
    n_rejects = sum(r["planned_reject"] is not None for u in units for r in u.rows)
    return Plan(units=units, rows_in=len(rows), planned_rejects=n_rejects,
                job_hash=content_hash([job, [u.hash for u in units]]))
