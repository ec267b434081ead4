"""Evaluation on a tiny model trained in the test: zero-shot prefers the true label; reports are written."""
import json

import numpy as np
import pytest
import torch

from clap_core.eval.evaluation import EvalItem, evaluate_retrieval, evaluate_zero_shot, write_report
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.train.loss import ClipLoss

SR = 48_000
CLASSES = {"low tone": 220.0, "high tone": 1760.0, "white noise": None}
CAPTIONS = ["a sound of {}", "{} heard clearly", "This is a sound of {}."]


def make_clip(label: str, rng: np.random.Generator, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    freq = CLASSES[label]
    if freq is None:
        wave = rng.normal(0, 0.2, t.shape)
    else:
        wave = 0.3 * np.sin(2 * np.pi * freq * rng.uniform(0.95, 1.05) * t + rng.uniform(0, 6.28))
    return (wave * rng.uniform(0.5, 1.0)).astype(np.float32)


@pytest.fixture(scope="module")
def trained_tiny():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = ClapModel(get_model_config("tiny", ["audio.clip_seconds=1.0"])).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # 3e-3 is fragile across thread counts
    labels = list(CLASSES)
    for step in range(300):
        waves = torch.from_numpy(np.stack([make_clip(label, rng) for label in labels]))
        out = model(waves, **model.tokenize([CAPTIONS[step % 3].format(label) for label in labels]))
        loss = ClipLoss()(out["audio_embeds"], out["text_embeds"], out["logit_scale"])["contrastive_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.logit_scale.clamp_()
    return model.eval()


def held_out_items(n_per_class: int = 4) -> list[EvalItem]:
    rng = np.random.default_rng(123)
    return [EvalItem(id=f"{label}-{i}", wave=make_clip(label, rng), label=label,
                     captions=[f"a sound of {label}", f"{label} heard clearly"])
            for label in CLASSES for i in range(n_per_class)]


def test_zero_shot_gives_the_matching_label_the_highest_probability(trained_tiny):
    items = held_out_items()
    probs = trained_tiny.zero_shot([it.wave for it in items], list(CLASSES), sample_rate=SR)
    truth = np.array([list(CLASSES).index(it.label) for it in items])
    assert (probs.argmax(1) == truth).all()
    assert (probs[np.arange(len(items)), truth] > 0.5).all()
    metrics = evaluate_zero_shot(trained_tiny, items)
    assert metrics["accuracy"] == 1.0 and metrics["labels"] == sorted(CLASSES)
    assert np.trace(np.array(metrics["confusion_matrix"])) == len(items)


def test_retrieval_metrics_beat_chance_and_count_captions(trained_tiny):
    metrics = evaluate_retrieval(trained_tiny, held_out_items())
    assert metrics["num_audio"] == 12 and metrics["num_captions"] == 24
    # The 4 clips of a class share caption texts: a caption's clip ranks in the class' top 4 when the
    # class is right (R@5 = 1), and a clip's captions tie with its class mates' (ranks <= 8, so R@10 = 1).
    assert metrics["t2a/R@5"] == 1.0 and metrics["a2t/R@10"] == 1.0
    assert metrics["t2a/R@1"] > 1 / 12


def test_zero_shot_rejects_labels_missing_from_the_candidates(trained_tiny):
    with pytest.raises(ValueError, match="missing from --labels"):
        evaluate_zero_shot(trained_tiny, held_out_items(1), labels=["low tone", "high tone"])


def test_reports_are_written(trained_tiny, tmp_path):
    items = held_out_items(2)
    zs = evaluate_zero_shot(trained_tiny, items)
    files = write_report(zs, "zero-shot", tmp_path / "zs", "zero-shot")
    assert json.loads((tmp_path / "zs" / "metrics.json").read_text())["accuracy"] == zs["accuracy"]
    assert "| accuracy |" in (tmp_path / "zs" / "metrics.md").read_text()
    assert (tmp_path / "zs" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    write_report(evaluate_retrieval(trained_tiny, items), "retrieval", tmp_path / "rt", "retrieval")
    assert (tmp_path / "rt" / "retrieval_recall.png").stat().st_size > 1000
    assert len(files) == 3
