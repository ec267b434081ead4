"""How the benchmarks time `clap embed` (pipelines.embed.embed_manifest) inside a warm local Ray session, for
bench_embed.py and bench_peers.py alike. Each measurement is three jobs of the same checkpoint, run one after the
other in the same conditions: the whole manifest (end to end), a one-clip job (the fixed cost: starting the
actor process, importing torch and transformers, loading the model) and a job of the manifest's first quarter.
Either runner of `clap embed`: "ray" (the Ray Data job: decode tasks, an actor pool) or "local" (in the
benchmark's own process, pipelines.embed_local: what `clap embed` runs for a small manifest with no cluster).

The steady state is the marginal rate between the quarter and the whole: (rows - quarter rows) / (seconds -
quarter seconds), the rate a long job runs at once it is going, which is what remains at corpus scale. Taking
the whole job less the one-clip job instead charged the steady state with what only a job's first batches pay:
a fresh actor process faults its first batches' memory in, and on a VM that backs memory lazily (this project's
2-core machine) that made the first two batches of 8 take 2.2 and 1.4 s against 0.5-0.6 s for the rest. Both
jobs of the difference pay that, and decode all of their own rows, so the difference keeps the decoding and
drops only what happens once per job. The session's first job also pays Ray Data's first use, so each session
starts with a one-clip warm-up job (`warm_up`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TimedJob:
    rows: int  # rows the job embedded
    seconds: float  # the whole job, end to end
    fixed: float  # a one-clip job of the same checkpoint right after it
    part_rows: int  # rows of the manifest's first quarter
    part_seconds: float  # a job on those rows, right after the one-clip job

    @property
    def end_to_end(self) -> float:  # clips/s
        return self.rows / self.seconds

    @property
    def steady(self) -> float:  # clips/s of the rows beyond the first quarter
        return (self.rows - self.part_rows) / max(self.seconds - self.part_seconds, 1e-9)


def first_rows_manifest(manifest: Path, n: int) -> Path:
    """The manifest's first n rows, in a file beside it (the same relative audio paths)."""
    part = manifest.with_name(f"{manifest.stem}-first{n}.jsonl")
    part.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()[:n]))
    return part


def run_job(checkpoint: str | Path, manifest: Path, output: Path, batch_size: int,
            runner: str = "ray", precision: str = "auto") -> tuple[int, float]:
    """(rows, seconds) of one `clap embed --no-text --runner RUNNER --precision PRECISION` job ("ray": the Ray
    Data job; "local": in this process, what `clap embed` runs for a small manifest when no Ray cluster is
    given)."""
    from pipelines.embed import embed_dataset

    start = time.perf_counter()
    summary = embed_dataset(str(checkpoint), str(manifest), str(output), batch_size=batch_size, text=False,
                            runner=runner, precision=precision)
    return summary["rows"], time.perf_counter() - start


def warm_up(checkpoint: str | Path, manifest: Path, output: Path, batch_size: int, runner: str = "ray",
            precision: str = "auto") -> float:
    """The session's first job, on one clip (Ray Data's first use; int8: the encoder's build when the cache
    lacks it); returns its seconds."""
    return run_job(checkpoint, first_rows_manifest(manifest, 1), output, batch_size, runner, precision)[1]


def time_job(checkpoint: str | Path, manifest: Path, output: Path, batch_size: int,
             runner: str = "ray", precision: str = "auto") -> TimedJob:
    """A job on the whole manifest into `output`, then a one-clip job into `output`-one and a job on the first
    quarter of the rows (whole batches, at least one) into `output`-part."""
    rows, seconds = run_job(checkpoint, manifest, output, batch_size, runner, precision)
    _, fixed = run_job(checkpoint, first_rows_manifest(manifest, 1), output.with_name(f"{output.name}-one"),
                       batch_size, runner, precision)
    quarter = max(batch_size, rows // 4 // batch_size * batch_size)
    if quarter >= rows:
        raise ValueError(f"a job of {rows} rows has no steady state to time at batch size {batch_size}")
    part_rows, part_seconds = run_job(checkpoint, first_rows_manifest(manifest, quarter),
                                      output.with_name(f"{output.name}-part"), batch_size, runner, precision)
    return TimedJob(rows, seconds, fixed, part_rows, part_seconds)
