"""Planning at scale: what the `clap preprocess` driver holds and how long it takes, for an N-row manifest.

    python benchmarks/bench_scale.py --rows 100000
    python benchmarks/bench_scale.py --rows 1000000 --no-baseline
    python benchmarks/bench_scale.py --rows 1000000 --command embed   # `clap embed` on the same manifest
    python benchmarks/bench_scale.py --rows 1000000 --command embed --format csv   # the same rows as a CSV

The manifest holds a few real clips and N - 4 rows whose audio files do not exist (rejected
`missing_file` without decoding), 1 in 1000 a duplicate id: the run measures the planning and
bookkeeping of N rows, not audio work. The job runs in a child process (the driver) on a fresh local
Ray with `--cores` CPUs; the child reports:

    planning        wall seconds of the distributed plan (count, route, resolve; plan.json written)
    driver peak     VmHWM of the driver process alone (Ray's workers and object store not included)
    first unit      seconds from the start until the first `_done/` marker appears
    total           wall seconds of the whole job (planning, units, manifest.json)
    object store    peak bytes used in the object store, sampled every 0.5 s
    resume          a second run on the finished output, in the same driver (Ray already up)

Baseline in the same run (skip with --no-baseline): the in-memory planner (`read_inputs` +
`plan_units`, what the driver did before planning was distributed) in its own child process, for its
wall time and VmHWM.

With --command embed, the child runs the Ray `clap embed` job (a tiny random-init checkpoint, --no-text) on the
manifest, read by Ray tasks a chunk at a time (pipelines/embed_input.py), and the baseline is the same job with
the manifest read whole into the driver's items (what it did before; what it still does up to
IN_DRIVER_MANIFEST_BYTES): driver peak (VmHWM) and wall time of each, rows and rejects checked equal.
With --format csv the manifest's rows are written as a CSV (id, audio_path, caption, split, kind, language): the
driver cuts it where records end (one streaming parse) and tasks read the ranges.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import child_process
from child_process import vm_hwm_mb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def job_child(manifest: str, out: str, cores: int, overrides: list[str]) -> dict:
    """The driver: runs the job, watches for the first marker and the object store, reports itself."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from clap_core.preprocess.config import load_preprocess_config
    from pipelines.preprocess import preprocess

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    seen = {"first_unit": None, "store_peak": 0}
    running = True

    def watch(start: float) -> None:
        while running:
            if seen["first_unit"] is None and os.path.isdir(f"{out}/_done") and any(
                    n.endswith(".json") for n in os.listdir(f"{out}/_done")):
                seen["first_unit"] = time.perf_counter() - start
            try:
                used = get_memory_info_reply(state).store_stats.object_store_bytes_used
                seen["store_peak"] = max(seen["store_peak"], int(used))
            except Exception:  # noqa: BLE001  (a sample lost while Ray is busy is not a result)
                pass
            time.sleep(0.5)

    cfg = load_preprocess_config(None, overrides)
    start = time.perf_counter()
    watcher = threading.Thread(target=watch, args=(start,), daemon=True)
    watcher.start()
    doc = preprocess(manifest, out, cfg)
    total = time.perf_counter() - start
    running = False
    watcher.join()
    again = preprocess(manifest, out, cfg)
    ray.shutdown()
    return {"plan_s": doc["run"]["plan_seconds"], "first_unit_s": seen["first_unit"], "total_s": total,
            "driver_peak_mb": vm_hwm_mb(), "store_peak_mb": seen["store_peak"] / 1e6, "units": doc["units"],
            "resume_s": again["run"]["seconds"], "resume_units": again["run"]["units_processed"],
            "rows_in": doc["rows_in"], "rejects": doc["rejects"]["rows"]}


def baseline_child(manifest: str, overrides: list[str]) -> dict:
    """The in-memory planner on the same manifest, as the driver ran it before."""
    from clap_core.data.inputs import read_inputs
    from clap_core.preprocess.config import load_preprocess_config
    from clap_core.preprocess.plan import plan_units

    start = time.perf_counter()
    plan = plan_units(read_inputs(manifest), load_preprocess_config(None, overrides))
    return {"plan_s": time.perf_counter() - start, "driver_peak_mb": vm_hwm_mb(), "units": len(plan.units)}


def embed_child(manifest: str, out: str, checkpoint: str, cores: int, whole: bool) -> dict:
    """The `clap embed` driver on the manifest; `whole`: its items read into the driver, as before."""
    import ray

    from pipelines import embed_input
    from pipelines.embed import embed_dataset

    if whole:
        embed_input.IN_DRIVER_MANIFEST_BYTES = float("inf")
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    # batches of 1024 rows: one rejects file per decode batch, and all but 4 rows here are rejects
    summary = embed_dataset(checkpoint, manifest, out, batch_size=1024, text=False, runner="ray")
    total = time.perf_counter() - start
    ray.shutdown()
    return {"total_s": total, "driver_peak_mb": vm_hwm_mb(), **summary}


def embed_run(manifest: str, work: str, rows: int, cores: int, baseline: bool) -> None:
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config

    torch.manual_seed(0)
    ClapModel(get_model_config("tiny")).save_pretrained(f"{work}/ckpt")
    runs = {"chunked": run_child("embed", manifest, f"{work}/emb", f"{work}/ckpt", str(cores), "chunked")}
    if baseline:
        runs["whole"] = run_child("embed", manifest, f"{work}/emb-whole", f"{work}/ckpt", str(cores), "whole")
    assert runs["chunked"]["rows"] + runs["chunked"]["rejects"] == rows, runs
    assert all(r["rows"] == runs["chunked"]["rows"] and r["reject_reasons"] == runs["chunked"]["reject_reasons"]
               for r in runs.values()), runs
    print("| rows | manifest read | driver peak (MB) | total (s) | embedded | rejects |")
    print("|---:|---|---:|---:|---:|---|")
    for name, r in runs.items():
        how = "by Ray tasks, a chunk each" if name == "chunked" else "whole, into the driver (before)"
        print(f"| {rows:,} | {how} | {r['driver_peak_mb']:.0f} | {r['total_s']:.1f} | {r['rows']} "
              f"| {r['reject_reasons']} |")


def as_csv(jsonl: str) -> str:
    """The JSONL manifest's rows as a CSV beside it (its path); streamed, never held."""
    columns = ["id", "audio_path", "caption", "split", "kind", "language"]
    path = str(Path(jsonl).with_suffix(".csv"))
    with open(jsonl, encoding="utf-8") as src, open(path, "w", newline="", encoding="utf-8") as dst:
        writer = csv.writer(dst)
        writer.writerow(columns)
        for line in src:
            record = json.loads(line)
            writer.writerow([record.get(c) or "" for c in columns])
    return path


def run_child(*args: str) -> dict:
    return child_process.run_child(__file__, *args, env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-memory planner baseline")
    parser.add_argument("--command", choices=["preprocess", "embed"], default="preprocess")
    parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="the manifest's format")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for the job, e.g. output.rows_per_unit=2000")
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "embed":
            result = embed_child(rest[0], rest[1], rest[2], int(rest[3]), whole=rest[4] == "whole")
        elif kind == "job":
            result = job_child(rest[0], rest[1], int(rest[2]), rest[3:])
        else:
            result = baseline_child(rest[0], rest[1:])
        print(json.dumps(result))
        return

    from clap_demo.synth import write_scale_manifest

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as work:  # outside the checkout: git never sees it
        t = time.perf_counter()
        manifest = str(write_scale_manifest(Path(work) / "in", args.rows, duplicate_every=1000))
        manifest = as_csv(manifest) if args.format == "csv" else manifest
        print(f"{args.rows:,}-row manifest ({os.path.getsize(manifest) / 1e6:.0f} MB) written in "
              f"{time.perf_counter() - t:.0f} s; {args.cores} cores; overrides {args.overrides or 'none'}")
        if args.command == "embed":
            embed_run(manifest, work, args.rows, args.cores, baseline=not args.no_baseline)
            return
        job = run_child("job", manifest, f"{work}/out", str(args.cores), *args.overrides)
        assert job["rows_in"] == args.rows and job["resume_units"] == 0, job
        base = None if args.no_baseline else run_child("baseline", manifest, *args.overrides)
        print("| rows | units | planning (s) | driver peak (MB) | first unit (s) | total (s) | object store peak (MB) "
              "| resume finished (s) | in-memory planner (s) | in-memory planner peak (MB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {args.rows:,} | {job['units']:,} | {job['plan_s']:.1f} | {job['driver_peak_mb']:.0f} "
              f"| {job['first_unit_s'] or float('nan'):.1f} | {job['total_s']:.1f} | {job['store_peak_mb']:.1f} "
              f"| {job['resume_s']:.2f} | {base['plan_s'] if base else float('nan'):.1f} "
              f"| {base['driver_peak_mb'] if base else float('nan'):.0f} |")


if __name__ == "__main__":
    main()
