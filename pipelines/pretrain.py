"""`clap pretrain`: contrastive pretraining on the Parquet shards of `clap preprocess`, Ray Train + DeepSpeed.

    clap pretrain --data SHARDS_DIR_OR_S3 --output RUN_DIR_OR_S3 --model tiny [--config FILE] [key=value ...]
    clap pretrain --data ... --output RUN --model tiny --export-only   # consolidate the latest checkpoint now

The recipe, as in the Ray Train docs: config -> Ray Data datasets (read shards -> decode, crop, tokenize,
split across workers) -> `train_fn_per_worker` (a ClapModel in a DeepSpeed engine, ZeRO stage from the
config, negatives from the global batch; report + checkpoint) -> `TorchTrainer.fit()` -> the result and the
export. The workers' side (the loop, checkpoints, export) is pipelines/pretrain_worker.py, imported only by
the workers: this module stays free of torch and the model classes, since Ray Train's controller imports it.
The pieces without Ray live in clap_core.train: engine.py (DeepSpeed, checkpoints), validation.py,
run_log.py (console, TensorBoard, metrics.json), worker.py (WorkerContext, the export), loss.py.

The run folder (local or s3://) is the Ray Train run: `<output>/checkpoint_<step>/` (DeepSpeed state of
every rank + train_state.json), `tensorboard/`, `metrics.json`, `curves.png`, and `final/` (the
`save_pretrained` export). Running the same command again with the same --output resumes from its
latest checkpoint; a worker failure restarts the worker group from it (scaling.max_failures).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import ray
import ray.train

from clap_core import storage
from clap_core.config import dump_yaml, from_dict, to_dict
from clap_core.data.rejects import REJECTS_DIR
from clap_core.data.shards import count_rows, shard_files
from clap_core.model.config import ClapModelConfig
from clap_core.storage import resolve_fs
from clap_core.train.batching import PairBatchTransform
from clap_core.train.config import PretrainConfig, load_pretrain_config, resolve_model_config
from clap_core.train.feed import buffer_rows_for
from pipelines.console import init_ray, plan_log
from pipelines.ray_shards import read_shards
from pipelines.train_console import StepLines

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain.yaml"
INGEST_CPUS = 1.0  # kept free for the Ray Data tasks that read, decode and feed the workers


# ---------------------------------------------------------------------------------------------
# datasets (driver): train is decoded and tokenized by Ray Data tasks and split across the workers;
# every worker reads all of valid


MAX_PASSES = 1024  # reads of the training split per Ray Data epoch at most (1024 passes of a 1-file split:
# 0.1 s to plan, 2.4 s to count 70k rows on 2 cores)


def epoch_passes(cfg: PretrainConfig, train_rows: int) -> int:
    """How many times one Ray Data epoch reads the training split. Ray Train's streaming split runs the dataset
    again at each epoch and the workers wait for its first blocks (44% of a 25-step interval in the demo), so
    a small corpus is repeated within an epoch: data.min_epoch_rows rows, or by default the whole run's and what
    each worker's feed reads ahead of its last step (shuffle buffer, the batch taken ahead, Ray Data's prefetch
    and the batch on its way), so a run never starts a second epoch for rows it will not train on."""
    wanted = cfg.data.min_epoch_rows
    if wanted is None:
        buffered = buffer_rows_for(cfg.data.shuffle_buffer, train_rows, cfg.scaling.num_workers)
        ahead = buffered + (cfg.data.prefetch_batches + 3) * cfg.train.batch_size  # per worker
        wanted = (cfg.train.steps * cfg.train.batch_size + ahead) * cfg.scaling.num_workers
    return min(MAX_PASSES, max(1, math.ceil(wanted / max(train_rows, 1))))


def build_datasets(data_uri: str, cfg: PretrainConfig, model_cfg: ClapModelConfig, train_rows: int,
                   rejects_uri: str | None = None) -> dict[str, ray.data.Dataset]:
    """Train (decoded, tokenized; undecodable rows go to rejects_uri with shard and id) and valid datasets;
    `train_rows`: the training split's rows (count_rows)."""
    train_files = shard_files(data_uri, cfg.data.train_split)  # manifest.json's list: never crash debris
    if not train_files:
        raise FileNotFoundError(f"no training shards at {data_uri.rstrip('/')}/{cfg.data.train_split}")
    transform = PairBatchTransform.for_model(model_cfg, training=True,
                                             clip_seconds=cfg.data.max_clip_seconds).ship_tokenizer()
    transform.rejects_uri = rejects_uri
    compute = ray.data.TaskPoolStrategy(size=cfg.data.decode_tasks) if cfg.data.decode_tasks else None
    passes = epoch_passes(cfg, train_rows)
    train = (read_shards(train_files, ["id", "path", "audio", "caption", "captions"], include_paths=True,
                         repeat=passes)
             .randomize_block_order()
             .map_batches(transform, batch_size=cfg.data.decode_batch_size, batch_format="numpy", compute=compute))
    datasets = {"train": train}
    valid_files = shard_files(data_uri, cfg.data.valid_split) if cfg.data.valid_split else []
    if valid_files:
        datasets["valid"] = read_shards(valid_files, ["id", "audio", "caption", "captions", "augment"])
    return datasets


# ---------------------------------------------------------------------------------------------
# the training function of every worker (pipelines/pretrain_worker.py)


class SetupError(RuntimeError):
    """A worker failed while building its model, engine or loss: the same config fails the same way on every
    try, so the run stops at once instead of being restarted scaling.max_failures times (see fail_fast_policy)."""


def train_fn_per_worker(config: dict) -> None:
    """Ray Train's function per worker. It imports the worker side when it runs: Ray Train's controller
    unpickles this function and so imports this module, which must stay light (no torch, no model classes:
    they cost the controller ~9 s of CPU on a 2-core machine before it asked for the workers).

    The training data is asked for first (clap_core.train.feed.Feed's reader thread): Ray Data starts reading and
    decoding while the worker imports the model code and builds its engine (~12 s on 2 cores), instead of after."""
    feed = None if config.get("export_only") else start_feed(config)
    try:
        from pipelines.pretrain_worker import train_fn_per_worker as run_worker

        run_worker(config, feed)
    finally:  # the reader thread stops asking Ray Data for rows (it would wait on a full buffer otherwise)
        if feed is not None:
            feed.close()


def start_feed(config: dict):
    """This worker's training batches, already being read into its shuffle buffer (a clap_core.train.feed.Feed)."""
    import ray.train.torch  # torch: already loaded in a Ray Train torch worker (its process group)

    from clap_core.train.feed import train_feed

    cfg = from_dict(PretrainConfig, config["pretrain"])
    return train_feed(ray.train.get_dataset_shard("train"), cfg, ray.train.torch.get_device(), config["train_rows"])


# ---------------------------------------------------------------------------------------------
# the trainer (driver)


def fail_fast_policy(failure_config):
    """Ray Train's default failure policy, except that a SetupError on any worker is raised at once."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    class FailFastPolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and any(
                    isinstance(e, SetupError) for e in training_failed_error.worker_failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return FailFastPolicy(failure_config)


def worker_resources_for(scaling, cluster_cpus: float) -> dict | None:
    """The workers' resources: as configured, except that CPU workers on a small Ray share what is left after
    INGEST_CPUS (2 workers x 1 CPU on 2 CPUs would starve the data pipeline and hang the run)."""
    if scaling.resources_per_worker or scaling.use_gpu:
        left = cluster_cpus - scaling.num_workers * (scaling.resources_per_worker or {}).get("CPU", 0)
        if left < INGEST_CPUS:  # said: the run itself waits silently for CPUs that never free up
            print(f"clap pretrain: {scaling.num_workers} workers x {scaling.resources_per_worker} leave {left:g} of "
                  f"Ray's {cluster_cpus:g} CPUs for data ingest (it needs {INGEST_CPUS:g}): training waits for data "
                  "until the cluster grows", file=sys.stderr, flush=True)
        return scaling.resources_per_worker or None
    if cluster_cpus >= scaling.num_workers + INGEST_CPUS or cluster_cpus <= INGEST_CPUS:
        return None  # Ray Train's default: 1 CPU each
    share = round((cluster_cpus - INGEST_CPUS) / scaling.num_workers, 3)
    print(f"clap pretrain: Ray has {cluster_cpus:g} CPUs: each of the {scaling.num_workers} workers gets {share:g} "
          f"CPU so that {INGEST_CPUS:g} stays free for data ingest (set scaling.resources_per_worker to choose)",
          file=sys.stderr, flush=True)
    return {"CPU": share}


def run_config(output: str, cfg: PretrainConfig, callbacks: list = ()) -> ray.train.RunConfig:
    """A stable run name (the output's last path component) so the same command finds its checkpoints."""
    fs, path = resolve_fs(output)
    parent, name = path.rstrip("/").rsplit("/", 1)
    return ray.train.RunConfig(name=name, storage_path=parent, storage_filesystem=fs,
                               failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                               checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                               callbacks=list(callbacks))


def pretrain(data: str, output: str, model: str, cfg: PretrainConfig, export_only: bool = False):
    """Run (or resume) training; returns the Ray Train result."""
    data, output = storage.absolute(data), storage.absolute(output)
    for uri in (data, output):
        storage.check_access(uri)  # a missing bucket or refused credentials stop here, naming the URI
    model_cfg = resolve_model_config(model, cfg.model)
    # Imports torch: in the driver only, not at module level (see above), and before ray.init: a `ray job submit`
    # driver that loads torch after connecting dies in torch's MKL loader (std::bad_alloc, "Intel oneMKL FATAL
    # ERROR: Cannot load libtorch_cpu.so"; Ray 2.60, torch 2.11).
    from ray.train.torch import TorchTrainer

    init_ray()  # a local Ray, or the cluster this job was submitted to (RAY_ADDRESS)
    with tempfile.TemporaryDirectory() as tmp:
        dump_yaml(cfg, Path(tmp) / "pretrain_config.yaml")
        dump_yaml(model_cfg, Path(tmp) / "model_config.yaml")
        for name in ("pretrain_config.yaml", "model_config.yaml"):
            storage.upload(Path(tmp) / name, storage.join(output, name))
    train_rows = count_rows(data, cfg.data.train_split)  # read once: the epoch's passes and the bad-row bound
    datasets = build_datasets(data, cfg, model_cfg, train_rows, rejects_uri=storage.join(output, REJECTS_DIR))
    scaling = cfg.scaling
    worker_resources = worker_resources_for(scaling, ray.cluster_resources().get("CPU", 0))

    lines = StepLines()  # rank 0's step lines, printed here (workers' output goes to Ray's logs)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"pretrain": to_dict(cfg), "model": to_dict(model_cfg), "run_uri": output,
                           "export_only": export_only, "has_valid": "valid" in datasets,
                           "train_rows": train_rows, "step_lines": lines.sink},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=worker_resources),
        run_config=run_config(output, cfg, lines.callbacks),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    import ray.train.v2.api.data_parallel_trainer as trainer_module  # Ray Train's only hook for the policy

    default_policy = trainer_module.create_failure_policy
    trainer_module.create_failure_policy = fail_fast_policy
    try:
        with lines:
            return trainer.fit()
    finally:
        trainer_module.create_failure_policy = default_policy


# ---------------------------------------------------------------------------------------------
# the `clap pretrain` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder or s3:// prefix written by `clap preprocess`")
    parser.add_argument("--output", required=True, help="run folder or s3:// prefix (re-running resumes it)")
    parser.add_argument("--model", default="tiny", help="registered model name or model YAML (default: tiny)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pretraining YAML (default: shipped)")
    parser.add_argument("--export-only", action="store_true",
                        help="load the latest checkpoint of --output and write final/ without training")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=500 scaling.num_workers=4")


def run(args: argparse.Namespace) -> int:
    cfg = load_pretrain_config(args.config, args.overrides)
    plan_log("pretrain", args.output)  # Ray's lines go to OUTPUT/logs/clap-pretrain.log
    try:
        result = pretrain(args.data, args.output, args.model, cfg, export_only=args.export_only)
    except ray.train.TrainingFailedError as e:
        setup = [err for err in getattr(e, "worker_failures", {}).values() if isinstance(err, SetupError)]
        if not setup:
            raise
        print(f"clap pretrain: {setup[0]} (a setup error: not retried)", file=sys.stderr)
        return 1
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith(("step", "val/t2a", "train/loss"))}
    print(json.dumps({"output": args.output, **metrics}))
    return 0
