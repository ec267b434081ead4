"""How the benchmarks time `clap embed` (pipelines.embed.embed_manifest) inside a warm local Ray session, for
bench_embed.py and bench_peers.py alike: a job, then that job's fixed cost (starting the actor process,
importing torch and transformers, loading the model) as a one-clip job run right after it, in the same
conditions. The steady state is the job less that fixed cost: it vanishes at corpus scale. The session's first
job also pays Ray Data's first use, so each session starts with a one-clip warm-up job (`warm_up`); taking the
fixed cost from it instead would overstate the steady state.
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

    @property
    def end_to_end(self) -> float:  # clips/s
        return self.rows / self.seconds

    @property
    def steady(self) -> float:  # clips/s without the fixed cost
        return self.rows / max(self.seconds - self.fixed, 1e-9)


def one_clip_manifest(manifest: Path) -> Path:
    """The manifest's first row alone, in a file beside it (the same relative audio paths)."""
    one = manifest.with_name(f"{manifest.stem}-one.jsonl")
    one.write_text(manifest.read_text().splitlines()[0] + "\n")
    return one


def run_job(checkpoint: str | Path, manifest: Path, output: Path, batch_size: int) -> tuple[int, float]:
    """(rows, seconds) of one `clap embed --no-text` job."""
    from pipelines.embed import embed_manifest

    start = time.perf_counter()
    summary = embed_manifest(str(checkpoint), str(manifest), str(output), batch_size=batch_size, text=False)
    return summary["rows"], time.perf_counter() - start


def warm_up(checkpoint: str | Path, manifest: Path, output: Path, batch_size: int) -> float:
    """The session's first job, on one clip (Ray Data's first use); returns its seconds."""
    return run_job(checkpoint, one_clip_manifest(manifest), output, batch_size)[1]


def time_job(checkpoint: str | Path, manifest: Path, output: Path, batch_size: int) -> TimedJob:
    """A job on the whole manifest into `output`, then its fixed cost (a one-clip job into `output`-one)."""
    rows, seconds = run_job(checkpoint, manifest, output, batch_size)
    _, fixed = run_job(checkpoint, one_clip_manifest(manifest), output.with_name(f"{output.name}-one"), batch_size)
    return TimedJob(rows, seconds, fixed)
