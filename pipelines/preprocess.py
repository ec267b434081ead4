"""`clap preprocess`: raw audio corpus -> augmented 48 kHz Parquet shards, exactly once, resumable.

    clap preprocess --input corpus/manifest.jsonl --output s3://bucket/shards [--config FILE] [key=value ...]

Planning runs in parallel Ray Data tasks (pipelines/preprocess_plan.py: read + validate manifest
chunks, route rows by a hash of their id, resolve duplicates and env-mix partners per group); the
driver holds per-unit summaries only, never the rows. Ray Data streams the units not yet committed
through an autoscaling actor pool (`ray.min_workers`..`ray.max_workers` actors of `ray.num_cpus`
CPUs, or a fixed `ray.concurrency`): with more units than actors the pool asks for more, and on an
autoscaling cluster Ray adds nodes for them and removes them when idle. Each actor reads its unit's
rows from the staged plan, processes them and commits its shards, rejects and `_done` marker itself
(clap_core.preprocess.unit.process_unit). The index, `manifest.json`, is written last from the markers
(clap_core.data.shards.build_index). Re-running the
same command resumes: the plan is read back from its marker, committed units are skipped, anything
uncommitted is deleted and redone.
Runs on a local Ray, or unchanged under `ray job submit` (ray.init() joins the cluster); on a
multi-node cluster write to s3:// or a shared filesystem, since each unit is written by the node
that runs it.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import ray

from clap_core import storage
from clap_core.config import from_dict, to_dict
from clap_core.data.markers import Marker, check_markers, read_markers
from clap_core.data.shards import build_index, clean_uncommitted, has_index, read_index, write_index
from clap_core.io_faults import retry_transient
from clap_core.preprocess.config import PreprocessConfig, load_preprocess_config
from clap_core.preprocess.plan import Plan, Unit, content_hash, job_config
from clap_core.preprocess.staging import drop_staging, load_unit_rows
from clap_core.preprocess.unit import build_merger, process_unit
from pipelines.console import init_ray, plan_log, progress
from pipelines.job_configs import default_config_path
from pipelines.preprocess_plan import plan_job


class SimulatedCrash(RuntimeError):
    """Raised by the driver when debug.crash_after_units is reached (resume tests)."""


class OutputMismatchError(ValueError):
    """The output folder holds units of a different job."""


class UnitProcessor:
    """Actor stage: one unit (Unit.to_dict as JSON) in, its marker (Marker.to_dict as JSON) out. Holds the
    caption merger."""

    def __init__(self, cfg: dict, out_uri: str):
        self.cfg = from_dict(PreprocessConfig, cfg)
        self.out_uri = out_uri
        self.merger = build_merger(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        markers = []
        for text in batch["unit"]:
            unit = Unit.from_dict(json.loads(text))

            def run(unit=unit):
                unit.rows = load_unit_rows(unit.pieces, unit.index)  # this unit's rows only, from the staged plan
                return process_unit(unit, self.cfg, self.out_uri, self.merger)

            # a unit is redone whole after a transient storage error (its writes are deterministic and atomic)
            markers.append(retry_transient(run, what=f"unit {unit.key}"))
        return {"marker": np.array([json.dumps(m.to_dict()) for m in markers], dtype=object)}


def pool_strategy(cfg: PreprocessConfig, n_units: int) -> ray.data.ActorPoolStrategy:
    """A fixed pool (ray.concurrency) or a range: Ray Data starts min_workers actors and asks for more
    (up to max_workers, or one per unit) while units wait, so an autoscaling cluster grows to fit."""
    if cfg.ray.concurrency:
        return ray.data.ActorPoolStrategy(size=min(cfg.ray.concurrency, n_units))
    high = min(cfg.ray.max_workers or n_units, n_units)
    return ray.data.ActorPoolStrategy(min_size=min(cfg.ray.min_workers, high), max_size=high)


def run_units(units: list[Unit], cfg: PreprocessConfig, out_uri: str) -> list[Marker]:
    """Process units on Ray Data (one unit per block, streamed); returns the markers of this run."""
    items = [{"unit": json.dumps(u.to_dict())} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        UnitProcessor, fn_constructor_args=(to_dict(cfg), out_uri), batch_size=1,
        compute=pool_strategy(cfg, len(units)), num_cpus=cfg.ray.num_cpus)
    markers, rows = [], iter(ds.iter_rows())
    try:
        for row in progress(rows, len(units), "preprocess units"):
            markers.append(Marker.from_dict(json.loads(row["marker"])))
            if cfg.debug.crash_after_units and len(markers) >= cfg.debug.crash_after_units:
                raise SimulatedCrash(f"debug.crash_after_units={cfg.debug.crash_after_units} reached")
    finally:
        rows.close()  # stops the streaming executor and its actors now, not when the traceback is freed
    return markers


def finished_index(out_uri: str, plan: Plan) -> dict | None:
    """The index (manifest.json) of an already finished identical job, else None."""
    if not has_index(out_uri):
        return None
    index = read_index(out_uri)
    if index.get("job_hash") != plan.job_hash:
        raise OutputMismatchError(f"{out_uri} already holds a finished output of a different job "
                                  f"(job hash {index.get('job_hash')} != {plan.job_hash}); use a new --output")
    return index


def preprocess(input_uri: str, out_uri: str, cfg: PreprocessConfig) -> dict:
    """Run or resume the job; returns the index (manifest.json) plus this run's timing in "run"."""
    start = time.perf_counter()
    input_uri, out_uri = storage.absolute(input_uri), storage.absolute(out_uri)
    for uri in (input_uri, out_uri):
        storage.check_access(uri)  # a missing bucket or refused credentials stop here, naming the URI
    plan, staging_root = plan_job(input_uri, out_uri, cfg)
    planned = time.perf_counter()
    done = finished_index(out_uri, plan)
    if done is not None:
        return {**done, "run": {"units_processed": 0, "seconds": time.perf_counter() - start, "seconds_in": 0.0,
                                "plan_seconds": planned - start}}
    markers = read_markers(out_uri)
    try:
        check_markers(plan.unit_hashes(), markers, out_uri)
    except ValueError as e:
        raise OutputMismatchError(str(e)) from None
    clean_uncommitted(out_uri, sorted({u.split for u in plan.units}), markers)
    todo = [u for u in plan.units if u.key not in markers]
    new = run_units(todo, cfg, out_uri) if todo else []
    markers = read_markers(out_uri)
    missing = [u.key for u in plan.units if u.key not in markers]
    if missing:
        raise RuntimeError(f"{len(missing)} units have no marker after the run, e.g. {missing[0]}")
    index = build_index([markers[u.key] for u in plan.units], input_uri=input_uri, job_hash=plan.job_hash,
                        rows_in=plan.rows_in, config=to_dict(cfg), config_hash=content_hash(job_config(cfg)))
    write_index(out_uri, index)
    drop_staging(staging_root)
    run_info = {"units_processed": len(new), "seconds": time.perf_counter() - start,
                "seconds_in": sum(m.seconds_in for m in new), "plan_seconds": planned - start}
    return {**index, "run": run_info}


def summary_line(result: dict) -> str:
    run = result["run"]
    rtf = run["seconds_in"] / run["seconds"] if run["seconds"] > 0 else 0.0
    return (f"clap preprocess: clips in {result['rows_in']}, rows out {result['rows_out']} "
            f"(from {result['sources_out']} clips), rejects {result['rejects']['rows']}, "
            f"hours out {result['hours_out']:.4f}, realtime factor {rtf:.1f}x "
            f"({run['units_processed']} of {result['units']} units processed in {run['seconds']:.1f} s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="JSONL/CSV manifest, AudioCaps/Clotho CSV, folder with sidecar captions, "
                             "WebDataset .tar or folder of them (local or s3://)")
    parser.add_argument("--output", required=True, help="output folder or s3:// prefix (re-running resumes it)")
    parser.add_argument("--config", default=str(default_config_path("preprocess")),
                        help="preprocessing YAML (default: the shipped pipelines/configs/preprocess.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. augment.copies=2 audio.silence=keep")


def run(args: argparse.Namespace) -> int:
    cfg = load_preprocess_config(args.config, args.overrides)
    for uri in (args.input, args.output):
        storage.check_access(storage.absolute(uri))  # before starting Ray: a refusal costs seconds, not a cluster
    if not ray.is_initialized():
        plan_log("preprocess", args.output)  # Ray's lines go to OUTPUT/logs/clap-preprocess.log
        # a local Ray, or the cluster this job was submitted to (RAY_ADDRESS); shut down by the CLI's finish_log
        # after a failure line is printed: shutting down here, while Ray Data's threads still wind down after a
        # failure, let the core worker end the process (exit 1) before the CLI said why
        init_ray(data_bars=False)
    try:
        result = preprocess(args.input, args.output, cfg)
    except OutputMismatchError as e:
        print(f"clap preprocess: {e}")
        return 2
    print(json.dumps({"output": args.output, "rows_in": result["rows_in"], "rows_out": result["rows_out"],
                      "rejects": result["rejects"]["by_reason"], "splits": result["splits"]}))
    print(summary_line(result))
    return 0
