"""The run's curves as one PNG: training loss per step and validation text->audio R@1 per evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

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
