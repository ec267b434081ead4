"""Preprocessing throughput: a plain single-process loop vs the Ray Data job on all cores.

    python benchmarks/bench_preprocess.py                  # 200 generated clips, 5-15 s, mixed formats/rates
    python benchmarks/bench_preprocess.py --clips 600 --cores 8

Both paths run the same clap_core functions on the same plan: (a) `process_unit` over every unit in
one process, (b) `pipelines.preprocess.preprocess` on a local Ray with `--cores` CPUs and one actor
per core, timed end to end (planning, actor start-up, commits, manifest). A job also has a fixed cost
that does not grow with the corpus (Ray Data start, actor processes importing the audio stack): it is
measured on a one-clip input and reported; "steady" excludes it, which is what a 22,000-hour job sees.
Realtime factor (RTF) = seconds of source audio / wall seconds; per core = that / cores. Reported
without augmentation and with the default chain plus `--copies` augmented copies. "unit CPU" compares
the CPU seconds the Ray actors spent inside units with the plain loop's: on a machine shared with other
work, wall-clock ratios move with the load while this one shows whether the work per clip is the same.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clap_core.data.inputs import read_inputs  # noqa: E402
from clap_core.preprocess.config import load_preprocess_config  # noqa: E402
from clap_core.preprocess.plan import plan_units  # noqa: E402
from clap_core.preprocess.unit import build_merger, process_unit  # noqa: E402
from clap_demo.synth import write_corpus  # noqa: E402

CORPUS_HOURS = 22_000
FORMATS = ("wav", "flac", "ogg", "mp3", "m4a", "mp4", "webm")


def plain_loop(manifest: Path, out: Path, cfg) -> tuple[float, float]:
    """(source audio seconds, wall seconds) of a single-process run over the planned units."""
    start = time.perf_counter()
    plan = plan_units(read_inputs(str(manifest)), cfg)
    merger = build_merger(cfg)
    markers = [process_unit(u, cfg, str(out), merger) for u in plan.units]
    return sum(m.seconds_in for m in markers), time.perf_counter() - start, sum(m.cpu_seconds for m in markers)


def ray_job(manifest: Path, out: Path, cfg) -> tuple[float, float]:
    from pipelines.preprocess import preprocess

    start = time.perf_counter()
    doc = preprocess(str(manifest), str(out), cfg)
    return doc["hours_in"] * 3600, time.perf_counter() - start, doc["cpu_hours"] * 3600


def fixed_cost(work: Path, cfg) -> float:
    """Wall seconds of the Ray job on a one-clip corpus: start-up that does not scale with the input."""
    manifest = write_corpus(work / "one", 1, seed=1, seconds=(1.0, 1.0))
    return ray_job(manifest, work / "one_out", cfg)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--seconds", type=float, nargs=2, default=(5.0, 15.0), help="clip length range")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--rows-per-unit", type=int, default=20)
    parser.add_argument("--copies", type=int, default=1, help="augmented copies per clip in the augmented runs")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_", dir=Path.cwd()))
    try:
        manifest = write_corpus(work / "corpus", args.clips, seed=0, formats=FORMATS,
                                sample_rates=(8000, 16000, 22050, 44100, 48000), seconds=tuple(args.seconds))
        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        base = [f"output.rows_per_unit={args.rows_per_unit}", f"ray.concurrency={args.cores}"]
        fixed_cost(work / "warmup", load_preprocess_config(None, base))  # first job on a fresh Ray starts its workers
        settings = {"no augmentation": base, f"augment, {args.copies} cop{'y' if args.copies == 1 else 'ies'}":
                    [*base, f"augment.copies={args.copies}"]}
        print(f"{args.clips} clips ({args.seconds[0]:g}-{args.seconds[1]:g} s; {', '.join(FORMATS)}; 8-48 kHz; "
              f"mono/stereo), {args.cores} cores, {args.rows_per_unit} clips per unit\n")
        print("| setting | plain RTF/core | Ray RTF/core end to end | Ray RTF/core steady | Ray / (plain x cores) "
              f"end to end | steady | Ray / plain unit CPU | fixed cost (s) | core-h for {CORPUS_HOURS:,} h (Ray) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for i, (name, overrides) in enumerate(settings.items()):
            cfg = load_preprocess_config(None, overrides)
            audio_s, plain_s, plain_cpu = plain_loop(manifest, work / f"plain{i}", cfg)
            fixed_s = fixed_cost(work / f"fixed{i}", cfg)
            ray_audio_s, ray_s, ray_cpu = ray_job(manifest, work / f"ray{i}", cfg)
            assert abs(ray_audio_s - audio_s) <= 1e-6 * audio_s, "both paths must see the same audio"
            plain = audio_s / plain_s
            e2e, steady = audio_s / ray_s / args.cores, audio_s / max(ray_s - fixed_s, 1e-9) / args.cores
            print(f"| {name} | {plain:.0f} | {e2e:.0f} | {steady:.0f} | {e2e / plain:.2f} | {steady / plain:.2f} "
                  f"| {ray_cpu / plain_cpu:.2f} | {fixed_s:.1f} | {CORPUS_HOURS / steady:,.0f} |")
        print(f"\n{audio_s / 3600:.3f} h of source audio per run; RTF = audio seconds / wall seconds.")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
