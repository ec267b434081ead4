"""`clap evaluate`: retrieval or zero-shot evaluation of a checkpoint on a manifest or shards.

    clap evaluate --checkpoint runs/a/final --data shards/ --split test --task retrieval --output eval/
    clap evaluate --checkpoint runs/a/final --data esc50.jsonl --task zero-shot --labels "dog,rain,siren" --output eval/

Writes OUTPUT/metrics.json, OUTPUT/metrics.md and a PNG; clips that cannot be used are listed in
OUTPUT/_rejects/evaluate.parquet (the reject records of every job, clap_core.data.rejects; rewritten by each
run) and counted in metrics.json, never silently skipped. Runs in one process (no Ray needed).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from clap_core.data.rejects import REJECTS_DIR, Reject, write_rejects
from clap_core.eval.evaluation import embed_items, evaluate_retrieval, evaluate_zero_shot, write_report
from clap_core.eval.metrics import DEFAULT_TEMPLATES
from clap_core.eval.sources import iter_eval_items
from clap_core.model.clap import ClapModel
from clap_core.storage import local_copy

TASKS = ("retrieval", "zero-shot")
REJECTS_FILE = "evaluate.parquet"  # OUTPUT/_rejects/evaluate.parquet: one file per run, rewritten by the next


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="save_pretrained folder (local or s3://)")
    parser.add_argument("--data", required=True, help="manifest (JSONL/CSV) or shard folder (local or s3://)")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--output", required=True, help="folder for metrics.json, metrics.md and PNGs")
    parser.add_argument("--split", default=None, help="only rows of this split (e.g. test)")
    parser.add_argument("--labels", default=None, help="comma-separated candidate labels (zero-shot)")
    parser.add_argument("--template", action="append", dest="templates",
                        help=f"prompt template with {{label}}; repeatable (default: {DEFAULT_TEMPLATES[0]!r})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--include-augmented", action="store_true",
                        help="shards: also evaluate augmented copies (default: one row per source clip)")


def evaluate(checkpoint: str, data: str, task: str, output: str, split: str | None = None,
             labels: list[str] | None = None, templates: list[str] | None = None, batch_size: int = 16,
             include_augmented: bool = False) -> dict:
    """Run one evaluation and write its reports; returns the metrics."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    model = ClapModel.from_pretrained(local_copy(checkpoint))
    rejects: list[Reject] = []
    items = _usable(iter_eval_items(data, split, augmented=include_augmented), rejects)
    embedded = embed_items(model, tqdm(items, desc="embedding clips", unit="clip"), batch_size)
    if task == "retrieval":
        metrics = evaluate_retrieval(model, embedded)
    else:
        metrics = evaluate_zero_shot(model, embedded, labels, templates or DEFAULT_TEMPLATES)
    metrics.update(task=task, checkpoint=checkpoint, data=data, split=split, num_rejects=len(rejects),
                   rejects_by_reason=dict(Counter(r["reason"] for r in rejects)))
    out = Path(output)
    write_report(metrics, task, out, f"{task}: {Path(checkpoint).name} on {Path(data).name}")
    write_rejects(str(out / REJECTS_DIR), rejects, name=REJECTS_FILE)  # also when empty: no stale file stays
    return metrics


def _usable(pairs, rejects: list[Reject]):
    for item, rejected in pairs:
        if rejected is not None:
            rejects.append(rejected)
        else:
            yield item


def run(args: argparse.Namespace) -> int:
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    metrics = evaluate(args.checkpoint, args.data, args.task, args.output, args.split, labels, args.templates,
                       args.batch_size, args.include_augmented)
    keys = ["accuracy", "t2a/R@1", "t2a/R@10", "a2t/R@1", "a2t/R@10", "t2a/mAP@10", "num_audio", "num_rejects"]
    print(" ".join(f"{k}={metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                   for k in keys if k in metrics))
    print(f"reports in {args.output}")
    return 0
