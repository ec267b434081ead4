"""Checkpoint evaluation: retrieval both directions and zero-shot classification, with reports.

Input is a list of `EvalItem`s (48 kHz mono waves with their captions and label); the job around it
(`clap evaluate`) reads them from a manifest or from shards. Reports: `metrics.json`, `metrics.md`
(a markdown table), and PNGs (R@k bars for retrieval, the confusion matrix for zero-shot).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from clap_core.eval.metrics import DEFAULT_TEMPLATES, retrieval_metrics, zero_shot_metrics
from clap_core.eval.plots import confusion_png, recall_png
from clap_core.model.inference import embed_text, embed_waveforms, zero_shot

if TYPE_CHECKING:
    from clap_core.model.clap import ClapModel


@dataclass
class EvalItem:
    id: str  # clip id
    wave: np.ndarray  # (N,) float32 mono at 48 kHz
    captions: list[str] = field(default_factory=list)  # every caption of the clip (AudioCaps/Clotho: 5)
    label: str | None = None  # class name for zero-shot


@dataclass
class EmbeddedItems:
    ids: list[str]
    audio: np.ndarray  # (N, D) unit audio embeddings
    captions: list[list[str]]
    labels: list[str | None]


def embed_items(model: "ClapModel", items: Iterable[EvalItem], batch_size: int = 16) -> EmbeddedItems:
    """Stream items through the audio encoder, keeping only embeddings and metadata (bounded memory)."""
    ids, captions, labels, chunks, pending = [], [], [], [], []
    for item in items:
        ids.append(item.id)
        captions.append(list(item.captions))
        labels.append(item.label)
        pending.append(item.wave)
        if len(pending) == batch_size:
            chunks.append(embed_waveforms(model, pending, batch_size))
            pending = []
    if pending:
        chunks.append(embed_waveforms(model, pending, batch_size))
    audio = np.concatenate(chunks) if chunks else np.zeros((0, model.config.embed_dim), np.float32)
    return EmbeddedItems(ids, audio, captions, labels)


def evaluate_retrieval(model: "ClapModel", items: Iterable[EvalItem] | EmbeddedItems, batch_size: int = 16) -> dict:
    """Text->audio and audio->text R@1/5/10, mAP@10, mean/median rank; several captions per clip."""
    data = items if isinstance(items, EmbeddedItems) else embed_items(model, items, batch_size)
    keep = [i for i, caps in enumerate(data.captions) if caps]
    if not keep:
        raise ValueError("retrieval needs clips with at least one caption")
    captions = [c for i in keep for c in data.captions[i]]
    owner = np.repeat(np.arange(len(keep)), [len(data.captions[i]) for i in keep])  # caption -> clip
    text = embed_text(model, captions)  # (Nt, D)
    metrics = retrieval_metrics(data.audio[keep], text, owner)
    metrics.update(num_audio=len(keep), num_captions=len(captions))
    return metrics


def evaluate_zero_shot(model: "ClapModel", items: Iterable[EvalItem] | EmbeddedItems,
                       labels: Sequence[str] | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                       batch_size: int = 16) -> dict:
    """Zero-shot accuracy of each clip's `label` against `labels` (default: the distinct labels present)."""
    data = items if isinstance(items, EmbeddedItems) else embed_items(model, items, batch_size)
    keep = [i for i, label in enumerate(data.labels) if label]
    if not keep:
        raise ValueError("zero-shot evaluation needs clips with a label")
    present = {data.labels[i] for i in keep}
    labels = list(labels) if labels else sorted(present)
    unknown = sorted(present - set(labels))
    if unknown:
        raise ValueError(f"clips carry labels missing from --labels: {unknown}")
    probs = zero_shot(model, None, labels, templates, audio_embeds=data.audio[keep])  # (N, C)
    truth = np.array([labels.index(data.labels[i]) for i in keep])
    metrics = zero_shot_metrics(probs, truth, labels)
    metrics.update(labels=labels, templates=list(templates), num_audio=len(keep),
                   chance_accuracy=1.0 / len(labels))
    return metrics


# --- reports ---


def scalar_table(metrics: dict) -> str:
    """Markdown table of the scalar metrics."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def per_class_table(per_class: dict[str, float]) -> str:
    lines = ["| class | accuracy |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in per_class.items()]
    return "\n".join(lines) + "\n"


def write_report(metrics: dict, task: str, output: Path, title: str) -> list[Path]:
    """metrics.json + metrics.md + the task's PNG into `output`; returns the files written."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    markdown = f"# {title}\n\n" + scalar_table(metrics)
    files = [output / "metrics.json", output / "metrics.md"]
    if task == "zero-shot":
        markdown += "\n## Per-class accuracy\n\n" + per_class_table(metrics["per_class_accuracy"])
        png = output / "confusion_matrix.png"
        png.write_bytes(confusion_png(metrics["confusion_matrix"], tuple(metrics["labels"]), title))
    else:
        png = output / "retrieval_recall.png"
        png.write_bytes(recall_png(metrics, title))
    files.append(png)
    (output / "metrics.md").write_text(markdown)
    return files
