"""`clap demo`: the whole pipeline on a small generated corpus, on this machine, in a few minutes.

    clap demo --output demo_output               # object storage on a local S3-protocol server (127.0.0.1)
    clap demo --output demo_output --storage local

The local S3 server is moto's, which only the `demo` extra installs (`pip install 'clap-at-scale[demo]'`;
`make demo` has it). Without it the default `--storage auto` keeps shards and embeddings in OUTPUT and says
so; `--storage s3` without it stops at once with the install line.

Stages: generate a mixed-format corpus (wav/flac/ogg/mp3/m4a at 16-48 kHz, mono and stereo, with
captions that describe what is audible) -> preprocess (Ray Data) -> pretrain `tiny` (Ray Train +
DeepSpeed, 2 workers) -> evaluate (retrieval and zero-shot) -> embed the test split -> a MELD-layout
emotion probe sweep (Ray Tune). Prints a summary table and writes it with the PNGs under OUTPUT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from clap_core.config import load_config
from pipelines.console import init_ray, start_log, verbose

DEMO_BUCKET = "clap-demo"
DEMO_EXTRA = "pip install 'clap-at-scale[demo]'"  # what installs the local S3 server (moto[server])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output", help="local folder for reports, plots and checkpoints")
    parser.add_argument("--storage", choices=("auto", "s3", "local"), default="auto",
                        help="shards and embeddings on a local S3-protocol server (s3; needs the demo extra: "
                             f"{DEMO_EXTRA}) or in OUTPUT (local); auto (default): s3 when the extra is installed")
    parser.add_argument("--clips", type=int, default=400, help="generated clips in the corpus")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--trials", type=int, default=6, help="probe sweep trials")


def local_s3_available() -> bool:
    """Whether moto's S3-protocol server (the `demo` extra: moto[server], Flask) imports."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


class MissingDemoExtra(RuntimeError):
    """--storage s3 asked for, but the local S3 server's packages are not installed."""


def choose_storage(requested: str) -> str:
    """The storage ("s3" or "local") for --storage auto / s3 / local; auto falls back to local, with a note on
    stderr, when the local S3 server is not installed."""
    if requested == "local":
        return "local"
    if local_s3_available():
        return "s3"
    if requested == "s3":
        raise MissingDemoExtra(f"--storage s3 needs a local S3-protocol server (moto), which is not installed: "
                               f"{DEMO_EXTRA}, or run clap demo --storage local")
    print(f"clap demo: no local S3 server installed ({DEMO_EXTRA} adds one): shards and embeddings go to the "
          "output folder instead (--storage local)", file=sys.stderr, flush=True)
    return "local"


@contextmanager
def local_s3_server():
    """moto's S3-protocol server on 127.0.0.1 with throw-away credentials in this process' environment."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo-secret", AWS_ENDPOINT_URL=endpoint,
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=DEMO_BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


class Stages:
    """Runs named stages, timing each; the summary rows are (stage, seconds, result)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        result = fn()
        self.rows.append((name, time.perf_counter() - start, result))
        print(f"--- {name}: {result} ({self.rows[-1][1]:.0f} s)", flush=True)

    def table(self) -> str:
        lines = ["| stage | seconds | result |", "|---|---|---|"]
        lines += [f"| {name} | {secs:.0f} | {result} |" for name, secs, result in self.rows]
        return "\n".join(lines) + "\n"


def demo(output: Path, storage_kind: str, clips: int, steps: int, trials: int) -> str:
    import ray

    from clap_demo.synth import write_corpus

    output.mkdir(parents=True, exist_ok=True)
    remote = f"s3://{DEMO_BUCKET}" if storage_kind == "s3" else str(output.resolve())
    shards, embeddings = f"{remote}/shards", f"{remote}/embeddings"
    stages = Stages()
    # The console shows the stages, their results and the pretraining step lines; Ray's lines and the S3
    # server's go to OUTPUT/logs/clap-demo.log, the workers' output (progress bars of every train worker,
    # "actor is dead" on shutdown) stays in Ray's session logs, unless --verbose (pipelines.console).
    init_ray(num_cpus=max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False, log_to_driver=verbose())
    try:
        stages.run("corpus", lambda: _corpus(write_corpus, output / "corpus", clips))
        stages.run("preprocess", lambda: _preprocess(output / "corpus" / "manifest.jsonl", shards))
        stages.run("pretrain", lambda: _pretrain(shards, output / "pretrain", steps))
        checkpoint = str(output / "pretrain" / "final")
        stages.run("evaluate retrieval", lambda: _evaluate(checkpoint, shards, "retrieval", output / "eval_retrieval"))
        stages.run("evaluate zero-shot", lambda: _evaluate(checkpoint, shards, "zero-shot", output / "eval_zero_shot"))
        stages.run("embed", lambda: _embed(checkpoint, shards, embeddings))
        stages.run("probe sweep", lambda: _probe(output, checkpoint, trials))
    finally:
        ray.shutdown()
    table = stages.table()
    pngs = sorted(str(p.relative_to(output)) for p in output.rglob("*.png"))
    (output / "summary.md").write_text("# clap demo\n\n" + table + "\nPlots:\n" + "".join(f"- {p}\n" for p in pngs))
    return table + "\nPlots under " + str(output) + ":\n" + "\n".join(f"  {p}" for p in pngs)


def _corpus(write_corpus, folder: Path, clips: int) -> str:
    manifest = write_corpus(folder, n_clips=clips, seed=0)
    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    formats = sorted({Path(r["audio_path"]).suffix for r in rows})
    return f"{len(rows)} clips in {', '.join(formats)}"


def _preprocess(manifest: Path, shards: str) -> str:
    from clap_core.preprocess.config import PreprocessConfig
    from pipelines.job_configs import default_config_path
    from pipelines.preprocess import preprocess, summary_line

    cfg = load_config(PreprocessConfig, default_config_path("preprocess"), ["augment.copies=1"])
    return summary_line(preprocess(str(manifest), shards, cfg)).removeprefix("clap preprocess: ")


def _pretrain(shards: str, run_dir: Path, steps: int) -> str:
    from clap_core.train.config import PretrainConfig
    from pipelines.job_configs import default_config_path
    from pipelines.pretrain import pretrain

    overrides = [f"train.steps={steps}", "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=20",
                 f"train.eval_every={max(steps // 4, 1)}", f"train.checkpoint_every={max(steps // 2, 1)}",
                 "train.log_every=25", "scaling.num_workers=2", "deepspeed.zero_stage=1"]
    cfg = load_config(PretrainConfig, default_config_path("pretrain"), overrides)
    pretrain(shards, str(run_dir), "tiny", cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    first, last = metrics["history"][0]["loss"], metrics["history"][-1]["loss"]
    r1 = (metrics["final_eval"] or {}).get("t2a/R@1", float("nan"))
    return f"{metrics['step']} steps, loss {first:.2f} -> {last:.2f}, validation t2a R@1={r1:.3f}"


def _evaluate(checkpoint: str, shards: str, task: str, out: Path) -> str:
    from pipelines.evaluate import evaluate

    m = evaluate(checkpoint, shards, task, str(out), split="test")
    if task == "zero-shot":
        return f"accuracy={m['accuracy']:.3f} (chance {m['chance_accuracy']:.3f}, {len(m['labels'])} labels)"
    return f"t2a R@1={m['t2a/R@1']:.3f} R@10={m['t2a/R@10']:.3f}, a2t R@1={m['a2t/R@1']:.3f}, {m['num_audio']} clips"


def _embed(checkpoint: str, shards: str, embeddings: str) -> str:
    from pipelines.embed import embed_dataset

    summary = embed_dataset(checkpoint, shards, embeddings, split="test")
    return f"{summary['rows']} clips embedded, {summary['rejects']} rejects -> {embeddings}"


def _probe(output: Path, checkpoint: str, trials: int) -> str:
    from clap_core.eval.probe_config import ProbeSweepConfig
    from clap_demo.synth_meld import write_meld
    from pipelines.job_configs import default_config_path
    from pipelines.tune_probe import tune_probe

    write_meld(output / "meld", layout="raw", corrupt=True)
    overrides = [f"tune.num_samples={trials}", "tune.max_concurrent_trials=2", "search.epochs=[8, 12]"]
    cfg = load_config(ProbeSweepConfig, default_config_path("tune_probe"), overrides)
    summary = tune_probe(str(output / "meld"), checkpoint, str(output / "probe"), cfg)
    probe, base = summary["test"]["probe"], summary["test"]["majority_baseline"]
    return (f"{summary['trials']} trials; test weighted F1={probe['weighted_f1']:.3f} vs majority baseline "
            f"{base['weighted_f1']:.3f}; {summary['embeddings']['rejects']} clip rejected")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:  # before anything is written: a missing extra costs the user nothing
        storage_kind = choose_storage(args.storage)
    except MissingDemoExtra as e:
        print(f"clap demo: {e}", file=sys.stderr)
        return 2
    start_log("demo", args.output)  # Ray's and the local S3 server's lines: OUTPUT/logs/clap-demo.log
    with (local_s3_server() if storage_kind == "s3" else _nothing()):
        summary = demo(Path(args.output), storage_kind, args.clips, args.steps, args.trials)
    print("\n" + summary)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; summary in {Path(args.output) / 'summary.md'}")
    return 0


@contextmanager
def _nothing():
    yield None
