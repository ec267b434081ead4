"""Plots as PNG: training curves, confusion matrices, retrieval recall@k (matplotlib, no display needed)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on workers and CI

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def plot_curves(history: Sequence[dict], evals: Sequence[dict], path: str | Path,
                recall_key: str = "t2a/R@1") -> Path:
    """history: [{'step', 'loss', ...}], evals: [{'step', 't2a/R@1', ...}] -> PNG at `path`."""
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    points = [e for e in evals if recall_key in e]
    ax_r1.plot([e["step"] for e in points], [e[recall_key] for e in points], marker="o", color="tab:green")
    ax_r1.set(xlabel="step", ylabel=recall_key, title=f"validation {recall_key}", ylim=(0, 1))
    for ax in (ax_loss, ax_r1):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_png(confusion: list[list[int]], classes: tuple[str, ...], title: str) -> bytes:
    """Row-normalised confusion matrix with the counts written in each cell, as PNG bytes."""
    counts = np.asarray(confusion)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 0.8 + 0.8 * len(classes)))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def recall_png(metrics: dict, title: str) -> bytes:
    """Bars of R@1/5/10 in both retrieval directions, as PNG bytes."""
    ks = ["R@1", "R@5", "R@10"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, direction, name in ((-0.2, "t2a", "text -> audio"), (0.2, "a2t", "audio -> text")):
        ax.bar(np.arange(3) + offset, [metrics[f"{direction}/{k}"] for k in ks], width=0.4, label=name)
    ax.set(xticks=range(3), xticklabels=ks, ylim=(0, 1), ylabel="recall", title=title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
