"""Distributed planning for `clap preprocess`: Ray Data tasks read and route the rows, the driver holds
only per-chunk and per-unit summaries (memory O(chunks + units), never O(rows)).

    plan = plan_job(input_uri, out_uri, cfg)     # Plan whose units name their staged pieces, not rows

Stages (clap_core.preprocess.plan documents the hashing, clap_core.preprocess.staging the staged files):
0. count   one task per chunk counts its rows -> global row offsets and the number of planning groups
1. route   one task per chunk reads, validates and writes its rows per planning group (by hash of id)
2. resolve one task per group: duplicate ids, env partners of the same split, exact unit of each row;
           writes the group's pieces of each unit and returns their row counts and hashes
The driver then writes OUT/_plan/<plan id>/plan.json (units, their hashes, the job hash): the commit
point of planning. The plan id hashes the input's files (names, sizes, modification times) and the
config, so a re-run of an unchanged job (resume, or a finished output) reads plan.json instead of the
input. Staged rows are deleted once the index (manifest.json) is written; plan.json stays.
"""
from __future__ import annotations

import json

import ray

from clap_core.data import input_chunks as chunking
from clap_core.data.inputs import ResolvedInput, resolve_input
from clap_core.io_faults import retry_transient
from clap_core.preprocess import plan as planner
from clap_core.preprocess import staging
from clap_core.preprocess.config import PreprocessConfig
from clap_core.preprocess.plan import Plan, content_hash, job_config, rows_per_unit

PLAN_FORMAT = "clap-plan/1"  # plan.json's "format" field


def run_tasks(fn, items: list[dict], num_cpus: float) -> list[dict]:
    """fn(item) -> a JSON-able result, over items as Ray Data tasks (one item per block); results in item order."""
    if not items:
        return []
    rows = [{"i": i, "item": json.dumps(item)} for i, item in enumerate(items)]

    def task(row: dict) -> dict:
        item = json.loads(row["item"])
        # a transient storage error is retried, never a verdict on the input (clap_core.io_faults)
        return {"i": row["i"], "result": json.dumps(retry_transient(lambda: fn(item), what="planning task"))}

    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(task, num_cpus=num_cpus)
    done = sorted(ds.take_all(), key=lambda r: r["i"])
    return [json.loads(r["result"]) for r in done]


def count_chunks(chunks: list[dict], num_cpus: float, encoding: str = "utf-8",
                 audio_dir: str | None = None) -> list[tuple[int, int]]:
    """(rows, lines) of each input chunk (input_chunks.count_lines), one Ray task per chunk."""
    counted = run_tasks(lambda c: list(chunking.count_lines(c, encoding, audio_dir)), chunks, num_cpus)
    return [(rows, lines) for rows, lines in counted]


def plan_root(out_uri: str, input_uri: str, cfg: PreprocessConfig, resolved: ResolvedInput | None = None) -> str:
    """OUT/_plan/<plan id>: the id hashes the input's files (names, sizes, mtimes) and the job config."""
    fingerprint = planner.input_fingerprint(input_uri, resolved)
    return staging.plan_root(out_uri, content_hash([input_uri, fingerprint, job_config(cfg)]))


def plan_job(input_uri: str, out_uri: str, cfg: PreprocessConfig) -> tuple[Plan, str]:
    """(plan, its staging folder): read from plan.json when this exact job was planned before."""
    resolved = resolve_input(input_uri)  # a folder listed once, for the plan's id and its chunks
    root = plan_root(out_uri, input_uri, cfg, resolved)
    doc = staging.read_plan_file(root)
    if doc is not None:
        return Plan.from_dict(doc), root
    enc, audio_dir = cfg.input.encoding, cfg.input.audio_dir
    chunks = chunking.input_chunks(input_uri, cfg.ray.plan_chunk_mb, enc, resolved)

    # 0. rows per chunk -> where each chunk's rows start in input order
    cpus = cfg.ray.num_cpus
    counted = count_chunks(chunks, cpus, enc, audio_dir)
    firsts = chunking.chunk_starts(chunks, counted)  # and each chunk's first_line
    rows_in = sum(rows for rows, _ in counted)
    groups = planner.group_count(rows_in, cfg)

    # 1. read + validate each chunk, write its rows per planning group
    def route(item: dict) -> dict:
        rows = chunking.read_chunk(item["chunk"], item["first"], enc, audio_dir)
        by_group, by_split = planner.route_rows(rows, groups, cfg)
        for g, part in by_group.items():
            staging.write_staged(staging.routed_file(root, item["c"], g), part)
        return {"counts": by_split}

    items = [{"c": c, "chunk": chunk, "first": first} for c, (chunk, first) in enumerate(zip(chunks, firsts))]
    routed = run_tasks(route, items, cpus)
    per_group = planner.merge_counts([{int(g): n for g, n in r["counts"].items()} for r in routed])
    size = rows_per_unit(cfg)
    units_per_split, offsets = planner.split_layout(per_group, size)

    # 2. per group: duplicates, env partners, units; pieces written per split
    def resolve(item: dict) -> dict:
        rows = staging.read_staged(item["files"])
        pieces = planner.resolve_group(rows, item["offsets"], size, cfg)
        info = {}
        for split in sorted({s for s, _ in pieces}):
            uri = staging.unit_file(root, split, item["g"])
            written = staging.write_unit_file(uri, {n: p for (s, n), p in pieces.items() if s == split})
            info[split] = {"uri": uri, "units": {str(n): v for n, v in written.items()}}
        return info

    files = {g: [staging.routed_file(root, c, g) for c, r in enumerate(routed) if str(g) in r["counts"]]
             for g in sorted(per_group)}
    resolved = run_tasks(resolve, [{"g": g, "files": files[g], "offsets": offsets[g]} for g in sorted(per_group)],
                         cpus)
    plan = planner.assemble_plan(resolved, units_per_split, rows_in, cfg)
    staging.write_plan_file(root, {"format": PLAN_FORMAT, "input": input_uri, **plan.to_dict()})
    return plan, root
