"""`clap tune-probe`: the MELD emotion probe on frozen CLAP embeddings, swept with Ray Tune (ASHA + Optuna).

    clap tune-probe --meld data/MELD.Raw --checkpoint runs/a/final --output sweeps/meld [--config FILE] [k=v ...]
    clap tune-probe --meld data/meld --checkpoint s3://b/runs/a/final --output s3://b/sweeps/meld tune.num_samples=64
    tensorboard --logdir sweeps/meld          # every trial's curves, live

Steps, each skipped when a previous run of the same command already did it:
  1. MELD CSVs -> OUTPUT/manifest.jsonl; `clap embed` (Ray Data) -> OUTPUT/embeddings/ (Parquet audio and utterance
     embeddings; undecodable clips and unusable CSV lines in OUTPUT/embeddings/_rejects/). The cache is keyed by
     the manifest and the checkpoint (OUTPUT/embed_cache.json), so trials and later runs only read it.
  2. Ray Tune: Optuna (TPE) proposes lr, weight decay, dropout, hidden sizes, batch size, class weighting and
     epochs, and, when the checkpoint has a speech tower (wav2vec2, whisper), the audio features: the CLAP
     embedding, the tower's last layer or a learned weighted sum of its layers (`clap embed` then also writes
     every pooled tower layer); ASHA stops weak trials early; each trial trains with early stopping on dev weighted F1, reports and
     checkpoints every epoch, and writes TensorBoard events in its trial folder OUTPUT/<tune.name>/<trial>/.
     An interrupted sweep (Ctrl-C, a lost driver) is restored with `Tuner.restore` by running the command again.
  3. The best trial's probe -> OUTPUT/best/ (probe.pt, probe.json, config.json), evaluated once on the test split
     beside the majority-class baseline: OUTPUT/best/test_metrics.json, OUTPUT/best/confusion_test.png, and
     OUTPUT/results.md with every trial sorted by dev weighted F1.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from ray import tune
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, SyncConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from clap_core import storage
from clap_core.config import ConfigError, from_dict, to_dict
from clap_core.data import embeddings
from clap_core.data.meld import EMOTIONS, read_meld, write_inputs
from clap_core.eval.plots import confusion_png
from clap_core.eval.probe import (
    ProbeMLP,
    ProbeTrainer,
    evaluate_probe,
    features,
    layer_layout,
    load_embeddings,
    majority_baseline,
    save_probe,
)
from clap_core.eval.probe_config import (
    ProbeConfig,
    ProbeSweepConfig,
    hidden_key,
    load_probe_sweep_config,
    with_params,
)
from clap_core.model.config import SPEECH_ENCODERS
from pipelines.console import init_ray, plan_log
from pipelines.job_configs import default_config_path
from pipelines.tune_console import TuneOutput

METRIC = "best_val_weighted_f1"  # running best of the dev weighted F1: what ASHA, Optuna and the export rank by
TRAIN_SPLIT, VALID_SPLIT, TEST_SPLIT = "train", "dev", "test"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meld", required=True, help="MELD folder: MELD.Raw or the reorganised meld/ layout")
    parser.add_argument("--checkpoint", required=True, help="CLAP save_pretrained folder (local or s3://)")
    parser.add_argument("--output", required=True, help="sweep folder or s3:// prefix (running again resumes it)")
    parser.add_argument("--config", default=str(default_config_path("tune_probe")), help="sweep YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.num_samples=32 probe.mode=audio")


def run(args: argparse.Namespace) -> int:
    cfg = load_probe_sweep_config(args.config, args.overrides)
    plan_log("tune-probe", args.output)  # Ray's lines go to OUTPUT/logs/clap-tune-probe.log
    summary = tune_probe(args.meld, args.checkpoint, args.output, cfg)
    print(json.dumps(summary))  # one line, last on stdout: `clap tune-probe ... | tail -1 | jq`
    return 0 if summary["status"] == "finished" else 130


def tune_probe(meld: str, checkpoint: str, output: str, cfg: ProbeSweepConfig, callbacks: tuple = ()) -> dict:
    """Embed (once), sweep (or resume the sweep), export and test the best probe; returns the summary.

    `callbacks` are extra Ray Tune callbacks for the sweep (e.g. experiment trackers).
    """
    meld, checkpoint, output = (storage.absolute(u) for u in (meld, checkpoint, output))
    try:  # before starting Ray: a wrong --meld is a user mistake, reported in one line
        rows, csv_rejects = read_meld(meld)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--meld: {e}") from e
    # a local Ray, or the cluster this job was submitted to (RAY_ADDRESS); with Ray already up it still opens the
    # planned log file, which the sweep's console (pipelines.tune_console) writes to
    context = init_ray()
    if context is not None and context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}", file=sys.stderr)
    layers = has_speech_tower(checkpoint)
    embeddings = embed_cache(rows, csv_rejects, checkpoint, output, cfg, layers)
    results, cfg = run_sweep(output, embeddings["uri"], cfg, callbacks, layers)  # a resumed sweep keeps its own config
    done = sum(1 for r in results if finished(r))
    if done < cfg.tune.num_samples:
        print(f"sweep interrupted after {done}/{cfg.tune.num_samples} trials; run the same command again to resume",
              file=sys.stderr)
        return {"status": "interrupted", "trials_done": done, "num_samples": cfg.tune.num_samples,
                "embeddings": embeddings["summary"]}
    summary = {"status": "finished", **export_best(results, output, embeddings, cfg)}
    storage.put_atomic(storage.join(output, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def finished(result) -> bool:
    """Errored, stopped by ASHA (done), early-stopped, or all its epochs: not a trial cut short by Ctrl-C."""
    m = result.metrics or {}
    return bool(result.error or m.get("done") or m.get("early_stopped")
                or m.get("epoch", 0) >= (result.config or {}).get("epochs", float("inf")))


# -------------------------------------------------------------------------------------------------
# 1. the embedding cache


def has_speech_tower(checkpoint: str) -> bool:
    """Whether the checkpoint's audio encoder is a speech tower, whose layers the sweep can choose among."""
    config = yaml.safe_load(storage.read_bytes(storage.join(checkpoint, "config.yaml"))) or {}
    return (config.get("audio_encoder") or {}).get("type") in SPEECH_ENCODERS


def embed_cache(rows: list[dict], csv_rejects: list[dict], checkpoint: str, output: str,
                cfg: ProbeSweepConfig, layers: bool = False) -> dict:
    """{"uri", "summary"} of OUTPUT/embeddings/, computed with `clap embed` unless this manifest+checkpoint is cached."""
    from pipelines.embed import embed_manifest

    inputs_uri, uri = storage.join(output, "manifest.jsonl"), storage.join(output, "embeddings")
    marker = storage.join(output, "embed_cache.json")
    key = cache_key(rows, checkpoint) + ("-layers" if layers else "")
    if storage.exists(marker) and json.loads(storage.read_bytes(marker))["key"] == key:
        return json.loads(storage.read_bytes(marker))
    write_inputs(rows, inputs_uri)
    embeddings.remove_output(uri)  # this job's own earlier embeddings of another manifest or checkpoint
    summary = embed_manifest(checkpoint, inputs_uri, uri, batch_size=cfg.embed.batch_size,
                             concurrency=cfg.embed.concurrency, text=True, layers=layers,
                             input_rejects=csv_rejects)  # CSV lines that are not a clip: counted with the rest
    cache = {"key": key, "uri": uri, "checkpoint": checkpoint, "summary": summary}
    storage.put_atomic(marker, json.dumps(cache, indent=2).encode())
    print(f"embedded {summary['rows']} clips, {summary['rejects']} rejected {summary['reject_reasons']} "
          f"(listed in {uri}/_rejects/)", file=sys.stderr)
    return cache


def cache_key(rows: list[dict], checkpoint: str) -> str:
    """Changes when a clip, caption or label changes, or the checkpoint's files do."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode())
    digest.update(checkpoint.encode())
    for uri in storage.list_files(checkpoint):
        digest.update(f"{uri[len(checkpoint):]}:{storage.file_size(uri)}".encode())
    return digest.hexdigest()[:16]


# -------------------------------------------------------------------------------------------------
# 2. the sweep


def train_trial(params: dict, *, cache: str, base: dict) -> None:
    """One Tune trial: the probe with this trial's hyperparameters, reporting and checkpointing every epoch."""
    from torch.utils.tensorboard import SummaryWriter

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))  # Ray sets it to the trial's CPUs
    cfg = with_params(from_dict(ProbeConfig, base), params)
    data = load_embeddings(cache, EMOTIONS)  # every trial reads the cache; MELD's is ~50 MB
    trainer = ProbeTrainer(cfg, data[TRAIN_SPLIT], data[VALID_SPLIT], EMOTIONS)
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a restored trial continues from its last finished epoch
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / "state.pt", weights_only=True))
    # The trial folder is synced to OUTPUT/<name>/<trial>/ (SyncConfig.sync_artifacts): one TensorBoard run per trial.
    writer = SummaryWriter(tune.get_context().get_trial_dir())
    while not trainer.done:
        metrics = trainer.run_epoch()
        for key, value in metrics.items():
            if key != "epoch":
                writer.add_scalar(key if "/" in key else key.replace("_", "/", 1), value, metrics["epoch"])
        writer.flush()
        metrics["early_stopped"] = trainer.bad_epochs >= cfg.patience
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.state_dict(), Path(folder) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    writer.close()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # short: it names the run in TensorBoard


def param_space(cfg: ProbeSweepConfig, layers: bool = False) -> dict:
    s = cfg.search
    choices = {"audio_features": tune.choice(list(s.audio_features))} if layers else {}
    return {**choices, "lr": tune.loguniform(*s.lr), "weight_decay": tune.loguniform(*s.weight_decay),
            "dropout": tune.uniform(*s.dropout), "hidden": tune.choice([hidden_key(h) for h in s.hidden]),
            "batch_size": tune.choice(list(s.batch_size)), "class_weights": tune.choice(list(s.class_weights)),
            "epochs": tune.randint(s.epochs[0], s.epochs[1] + 1)}


def starting_point(cfg: ProbeSweepConfig, layers: bool = False) -> list[dict]:
    """The probe config's own values as the first trial (CLARA's setting) when they lie inside the search space."""
    p, s = cfg.probe, cfg.search
    point = {"lr": p.lr, "weight_decay": p.weight_decay, "dropout": p.dropout, "hidden": hidden_key(p.hidden),
             "batch_size": p.batch_size, "class_weights": p.class_weights, "epochs": p.epochs}
    inside = (s.lr[0] <= p.lr <= s.lr[1] and s.weight_decay[0] <= p.weight_decay <= s.weight_decay[1]
              and s.dropout[0] <= p.dropout <= s.dropout[1] and list(p.hidden) in [list(h) for h in s.hidden]
              and p.batch_size in s.batch_size and p.class_weights in s.class_weights
              and s.epochs[0] <= p.epochs <= s.epochs[1])
    if layers:
        point["audio_features"] = p.audio_features
        inside = inside and p.audio_features in s.audio_features
    return [point] if inside else []


def build_tuner(trainable, output: str, cfg: ProbeSweepConfig, callbacks: tuple, layers: bool = False,
                console: TuneOutput | None = None) -> Tuner:
    """`console`: Tune's verbosity and the trials bar (pipelines.tune_console); None: Tune's own output."""
    console = console or TuneOutput(cfg.tune.num_samples, METRIC, "max")
    fs, path = storage.resolve_fs(output)
    t = cfg.tune
    searcher = OptunaSearch(points_to_evaluate=starting_point(cfg, layers) or None, seed=t.seed)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.search.epochs[1],
                              grace_period=min(t.grace_period, cfg.search.epochs[1]),
                              reduction_factor=t.reduction_factor)
    tune_config = TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                             num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent_trials,
                             trial_dirname_creator=trial_dirname)
    run_config = RunConfig(name=t.name, storage_path=path, storage_filesystem=fs,
                           callbacks=[*callbacks, *console.callbacks], sync_config=SyncConfig(sync_artifacts=True),
                           checkpoint_config=CheckpointConfig(num_to_keep=1),
                           failure_config=FailureConfig(max_failures=1), verbose=console.verbose)
    return Tuner(trainable, param_space=param_space(cfg, layers), tune_config=tune_config, run_config=run_config)


def run_sweep(output: str, cache: str, cfg: ProbeSweepConfig, callbacks: tuple = (),
              layers: bool = False) -> tuple[tune.ResultGrid, ProbeSweepConfig]:
    """A new sweep, or the restored one when OUTPUT/<tune.name> holds an experiment; its results and config.

    A restored sweep runs with the config it started with (OUTPUT/sweep_config.yaml): its search space and
    trials are already fixed in the experiment state.
    """
    fs, path = storage.resolve_fs(output)
    experiment = f"{path}/{cfg.tune.name}"
    saved = storage.join(output, "sweep_config.yaml")
    restoring = Tuner.can_restore(experiment, storage_filesystem=fs)
    if restoring:
        original = load_probe_sweep_config(yaml.safe_load(storage.read_bytes(saved)))
        if to_dict(original) != to_dict(cfg):
            print(f"resuming {experiment} with the config it started with ({saved}); changes are ignored",
                  file=sys.stderr)
        cfg = original
    else:
        storage.put_atomic(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    trainable = tune.with_parameters(train_trial, cache=cache, base=to_dict(cfg.probe))
    trainable = tune.with_resources(trainable, {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial})
    console = TuneOutput(cfg.tune.num_samples, METRIC, "max")  # one bar over the trials, or Tune's own output
    if restoring:
        print(f"resuming the sweep in {experiment}", file=sys.stderr)
        tuner = Tuner.restore(experiment, trainable=trainable, resume_errored=True, storage_filesystem=fs)
        console.apply(tuner)
    else:
        tuner = build_tuner(trainable, output, cfg, callbacks, layers, console)
    with console:
        results = tuner.fit()
    experiment_uri = storage.join(output, cfg.tune.name)
    for uri in storage.list_files(experiment_uri):
        if uri[len(experiment_uri):].count("/") == 2 and uri.endswith(("/result.json", "/progress.csv")):
            drop_replayed_epochs(uri)  # OUTPUT/<name>/<trial>/result.json, progress.csv
    return results, cfg


def drop_replayed_epochs(trial_log: str) -> None:
    """Keep one line per epoch in a trial's result.json or progress.csv: the last one reported.

    A driver killed on a long-lived Ray cluster leaves Tune's driver staging folder behind, and the restored
    sweep (same Ray session) reuses it: lines the killed driver logged after its last experiment checkpoint
    stay in the trial's log while the trial itself restarts from its last checkpoint known to the experiment
    state and reports those epochs again. The later lines are the ones the trial's checkpoints descend from.
    """
    text = storage.read_bytes(trial_log).decode()
    if trial_log.endswith(".json"):
        rows = [line for line in text.splitlines() if line.strip()]
        epochs = [json.loads(line).get("epoch") for line in rows]
    else:
        header, *rows = list(csv.reader(io.StringIO(text))) or [[]]
        epochs = [dict(zip(header, row)).get("epoch") for row in rows]
    last = {epoch: i for i, epoch in enumerate(epochs)}  # epoch -> index of its last line
    if len(last) == len(rows):
        return  # no epoch reported twice: the file stays as Tune wrote it
    kept = [rows[i] for i in sorted(last.values())]
    if trial_log.endswith(".json"):
        data = "".join(line + "\n" for line in kept)
    else:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([header, *kept])
        data = buffer.getvalue()
    storage.put_atomic(trial_log, data.encode())


# -------------------------------------------------------------------------------------------------
# 3. export, test and report


def export_best(results: tune.ResultGrid, output: str, embeddings: dict, cfg: ProbeSweepConfig) -> dict:
    """Best trial -> OUTPUT/best/, tested once on the test split; results.md; returns what summary.json holds."""
    best = results.get_best_result(metric=METRIC, mode="max", scope="last")
    probe_cfg = with_params(cfg.probe, best.config)
    data = load_embeddings(embeddings["uri"], EMOTIONS)
    with best.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", weights_only=True)
    in_dim = features(data[TRAIN_SPLIT], probe_cfg.mode, probe_cfg.audio_features).shape[1]
    model = ProbeMLP(in_dim, probe_cfg.hidden, len(EMOTIONS), probe_cfg.dropout,
                     **layer_layout(probe_cfg, data[TRAIN_SPLIT]))
    model.load_state_dict(state["best_state"])  # the best dev epoch, not the last one
    model.eval()
    best_uri = storage.join(output, "best")
    save_probe(best_uri, model, probe_cfg, EMOTIONS)
    trial = {"trial_id": best.metrics["trial_id"], "params": best.config, "val_weighted_f1": best.metrics[METRIC],
             "probe": to_dict(probe_cfg)}
    storage.put_atomic(storage.join(best_uri, "config.json"), json.dumps(trial, indent=2).encode())
    test = {"probe": evaluate_probe(model, data[TEST_SPLIT], probe_cfg.mode, EMOTIONS, probe_cfg.audio_features),
            "majority_baseline": majority_baseline(data[TRAIN_SPLIT].labels, data[TEST_SPLIT].labels, EMOTIONS)}
    storage.put_atomic(storage.join(best_uri, "test_metrics.json"), json.dumps(test, indent=2).encode())
    title = f"MELD test, {probe_cfg.mode} probe (weighted F1 {test['probe']['weighted_f1']:.3f})"
    storage.put_atomic(storage.join(best_uri, "confusion_test.png"),
                       confusion_png(test["probe"]["confusion"], EMOTIONS, title))
    table = trial_rows(results)
    storage.put_atomic(storage.join(output, "results.md"), results_markdown(trial, test, table, embeddings).encode())
    return {"best": trial, "test": {k: {m: v[m] for m in ("accuracy", "weighted_f1", "macro_f1")} for k, v in test.items()},
            "trials": len(table), "embeddings": embeddings["summary"], "output": output}


def trial_rows(results: tune.ResultGrid) -> list[dict]:
    """One row per trial, best dev weighted F1 first."""
    rows = []
    for r in results:
        m, c = r.metrics or {}, r.config or {}
        if r.error:
            status = "error"
        elif m.get("early_stopped"):
            status = "early stop"
        elif m.get("epoch", 0) < c.get("epochs", 0):
            status = "ASHA stop"
        else:
            status = "complete"
        rows.append({"trial": m.get("trial_id", "?"), "status": status, "epochs_run": m.get("epoch", 0),
                     "best_val_wf1": m.get(METRIC, float("nan")), "val_acc": m.get("val_accuracy", float("nan")),
                     **c})
    return sorted(rows, key=lambda row: -row["best_val_wf1"] if row["best_val_wf1"] == row["best_val_wf1"] else 1)


def results_markdown(best: dict, test: dict, trials: list[dict], embeddings: dict) -> str:
    probe, base = test["probe"], test["majority_baseline"]
    lines = ["# MELD emotion probe sweep", "",
             f"Best trial `{best['trial_id']}` (dev weighted F1 {best['val_weighted_f1']:.4f}), "
             f"`{best['probe']['mode']}` probe: `{json.dumps(best['params'])}`", "",
             f"Embeddings: {embeddings['summary']['rows']} clips, {embeddings['summary']['rejects']} rejected "
             f"{embeddings['summary']['reject_reasons']}.", "",
             "## Test split", "",
             f"| metric | tuned probe | majority baseline (`{base['predicted_class']}`) |", "|---|---|---|"]
    for key in ("accuracy", "weighted_f1", "macro_f1"):
        lines.append(f"| {key} | {probe[key]:.4f} | {base[key]:.4f} |")
    for name in EMOTIONS:
        lines.append(f"| F1 {name} (n={probe['support'][name]}) | {probe['per_class_f1'][name]:.4f} | "
                     f"{base['per_class_f1'][name]:.4f} |")
    lines += ["", "![confusion matrix](best/confusion_test.png)", "", f"## All trials ({len(trials)})", "",
              "| trial | status | epochs run | best dev wF1 | dev acc | lr | weight decay | dropout | hidden | batch | "
              "class weights | max epochs |", "|" + "---|" * 12]
    for t in trials:
        lines.append(f"| {t['trial']} | {t['status']} | {t['epochs_run']} | {t['best_val_wf1']:.4f} | "
                     f"{t['val_acc']:.4f} | {t.get('lr', float('nan')):.2e} | {t.get('weight_decay', float('nan')):.2e} | "
                     f"{t.get('dropout', float('nan')):.3f} | {t.get('hidden')} | {t.get('batch_size')} | "
                     f"{t.get('class_weights')} | {t.get('epochs')} |")
    return "\n".join(lines) + "\n"
