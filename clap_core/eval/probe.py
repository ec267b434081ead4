"""A classification probe on frozen CLAP embeddings (the MELD emotion experiment of CLARA), pure torch.

    data = load_embeddings("out/embeddings", EMOTIONS)           # split -> ProbeData, from `clap embed` Parquet
    trainer = fit_probe(ProbeConfig(), data["train"], data["dev"])
    metrics = evaluate_probe(trainer.best_model(), data["test"], trainer.cfg.mode, EMOTIONS)
    baseline = majority_baseline(data["train"].labels, data["test"].labels, EMOTIONS)

The probe is an MLP over the L2-normalised audio and text embeddings concatenated (2d -> 512 -> 128 -> K
with dropout by default), or over one modality alone. With a speech tower (wav2vec 2.0, Whisper), the audio
side can instead be the tower's own pooled layers (`audio_features`): its last layer, or a softmax-weighted
sum of all layers learned with the probe (SUPERB's protocol). Cross-entropy, optionally weighted by inverse class
frequency (MELD's test split is 48% neutral), AdamW, early stopping on validation weighted F1: the weights
of the best validation epoch are the probe's result. Training is deterministic given `seed`, and
`ProbeTrainer.state_dict()` holds everything needed to continue an interrupted run exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from clap_core import storage
from clap_core.config import ConfigError
from clap_core.data import embeddings
from clap_core.eval.metrics import classification_metrics, l2_normalize
from clap_core.eval.probe_config import (
    ProbeConfig,
)

# -------------------------------------------------------------------------------------------------
# data


@dataclass
class ProbeData:
    ids: list[str]
    audio: np.ndarray  # (N, D) float32
    text: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64 class indices
    audio_layers: Optional[np.ndarray] = None  # (N, L, H) float32: a speech tower's pooled layers, when embedded

    def __len__(self) -> int:
        return len(self.ids)


def load_embeddings(uri: str, classes: tuple[str, ...]) -> dict[str, ProbeData]:
    """split -> ProbeData from a `clap embed` output (clap_core.data.embeddings; local or s3://)."""
    import pyarrow.compute as pc

    table = embeddings.read_table(uri)  # sorted by id: file order depends on the embedding job's scheduling
    index = {name: i for i, name in enumerate(classes)}
    unknown = set(table.column("label").to_pylist()) - set(index)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} of {uri} are not among the classes {classes}")
    out = {}
    for split in sorted(set(table.column("split").to_pylist())):
        part = table.filter(pc.equal(table.column("split"), split))
        out[split] = ProbeData(ids=part.column("id").to_pylist(),
                               audio=embeddings.embedding_matrix(part, "audio_embedding"),
                               text=embeddings.embedding_matrix(part, "text_embedding"),
                               labels=np.array([index[x] for x in part.column("label").to_pylist()], dtype=np.int64),
                               audio_layers=embeddings.layer_matrix(part))
    return out


def features(data: ProbeData, mode: str, audio_features: str = "embedding") -> torch.Tensor:
    """(N, 2D) for concat, (N, D) for one modality; each modality L2-normalised so neither dominates.

    audio_features 'last' uses the speech tower's pooled last layer (N, H) as the audio part; 'weighted'
    puts all its layers first, flattened (N, L * H), for the probe's learned layer weights (`layer_layout`).
    """
    audio = [l2_normalize(data.audio)]
    if audio_features != "embedding":
        if data.audio_layers is None:
            raise ConfigError(f"audio_features='{audio_features}' needs per-layer features: embed a checkpoint "
                              "with a speech tower (wav2vec2, whisper) with layers=True")
        layers = data.audio_layers
        audio = [l2_normalize(layers[:, -1])] if audio_features == "last" else \
            [l2_normalize(layers[:, i]) for i in range(layers.shape[1])]
    text = [l2_normalize(data.text)]
    parts = {"audio": audio, "text": text, "concat": audio + text}[mode]
    return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))


def layer_layout(cfg: ProbeConfig, data: ProbeData) -> dict:
    """ProbeMLP kwargs for the learned layer weights: {} unless the audio side is the weighted layer sum."""
    if cfg.audio_features != "weighted" or cfg.mode == "text":
        return {}
    return {"mix_layers": data.audio_layers.shape[1], "layer_dim": data.audio_layers.shape[2]}


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(K,) weights N / (K * n_c), 0 for classes absent from training (they contribute no loss anyway)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


# -------------------------------------------------------------------------------------------------
# baseline


def majority_baseline(train_labels: np.ndarray, y_true: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Metrics of always predicting the most frequent training class (neutral, on MELD)."""
    majority = int(np.bincount(train_labels, minlength=len(classes)).argmax())
    metrics = classification_metrics(y_true, np.full(len(y_true), majority), classes)
    return {**metrics, "predicted_class": classes[majority]}


# -------------------------------------------------------------------------------------------------
# model and training


class Standardize(nn.Module):
    """(x - mean) / std with train-split statistics as buffers, so a saved probe applies them too.

    Embeddings of one CLAP model share a large common component (cosines near 1 between class means are usual
    for a weak encoder); removing it puts the class differences on the scale the MLP's initialisation expects.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> "Standardize":
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(x.std(dim=0).clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ProbeMLP(nn.Module):
    """(B, in_dim) -> (B, K). With mix_layers L > 0 the first L * layer_dim inputs are L layers, mixed into one
    layer_dim vector by learned softmax weights (zeros at start: the plain average) before the MLP."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_classes: int, dropout: float,
                 mix_layers: int = 0, layer_dim: int = 0):
        super().__init__()
        self.in_dim, self.mix_layers, self.layer_dim = in_dim, mix_layers, layer_dim
        self.standardize = Standardize(in_dim)  # identity until fit
        self.layer_weights = nn.Parameter(torch.zeros(mix_layers)) if mix_layers else None
        in_dim -= (mix_layers - 1) * layer_dim if mix_layers else 0
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        layers.append(nn.Linear(in_dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)  # (B, F)
        if self.mix_layers:
            split = self.mix_layers * self.layer_dim
            stack = x[:, :split].reshape(len(x), self.mix_layers, self.layer_dim)  # (B, L, H)
            mixed = torch.einsum("l,blh->bh", self.layer_weights.softmax(0), stack)
            x = torch.cat([mixed, x[:, split:]], dim=1)  # (B, H + rest)
        return self.net(x)  # (B, K) logits


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(N,) predicted classes and the (N, K) logits, in eval mode (no dropout)."""
    model.eval()
    logits = model(x)
    return logits.argmax(dim=1).numpy(), logits


class ProbeTrainer:
    """One probe run, an epoch at a time, so a caller (a Tune trial) can report and checkpoint between epochs."""

    def __init__(self, cfg: ProbeConfig, train: ProbeData, valid: ProbeData, classes: tuple[str, ...]):
        self.cfg, self.classes = cfg, classes
        self.x_train = features(train, cfg.mode, cfg.audio_features)  # (N, F)
        self.x_valid = features(valid, cfg.mode, cfg.audio_features)
        self.y_train, self.y_valid = torch.from_numpy(train.labels), torch.from_numpy(valid.labels)  # (N,)
        torch.manual_seed(cfg.seed)
        self.model = ProbeMLP(self.x_train.shape[1], cfg.hidden, len(classes), cfg.dropout,
                              **layer_layout(cfg, train))
        if cfg.standardize:
            self.model.standardize.fit(self.x_train)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        weight = inverse_frequency_weights(train.labels, len(classes)) if cfg.class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight)
        self.epoch, self.bad_epochs, self.best_f1 = 0, 0, -1.0
        self.best_state = copy.deepcopy(self.model.state_dict())

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs or self.bad_epochs >= self.cfg.patience

    def train_epoch(self) -> float:
        """One pass over the shuffled train split; the mean loss."""
        self.model.train()
        torch.manual_seed(self.cfg.seed * 1000 + self.epoch)  # dropout and order depend on the epoch only
        order = torch.randperm(len(self.y_train))
        losses = []
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start:start + self.cfg.batch_size]
            loss = self.loss_fn(self.model(self.x_train[idx]), self.y_train[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        return float(np.mean(losses))

    def run_epoch(self) -> dict:
        """Train one epoch, validate, keep the best weights; the epoch's metrics."""
        train_loss = self.train_epoch()
        pred, logits = predict(self.model, self.x_valid)
        val = classification_metrics(self.y_valid.numpy(), pred, self.classes)
        self.epoch += 1
        if val["weighted_f1"] > self.best_f1:
            self.best_f1, self.bad_epochs = val["weighted_f1"], 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_epochs += 1
        return {"epoch": self.epoch, "train_loss": train_loss,
                "val_loss": float(nn.functional.cross_entropy(logits, self.y_valid).item()),
                "val_accuracy": val["accuracy"], "val_weighted_f1": val["weighted_f1"],
                "val_macro_f1": val["macro_f1"], "best_val_weighted_f1": self.best_f1,
                **{f"val_f1/{c}": f for c, f in val["per_class_f1"].items()}}

    def best_model(self) -> ProbeMLP:
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best_state)
        return model.eval()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "bad_epochs": self.bad_epochs, "best_f1": self.best_f1, "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.bad_epochs, self.best_f1 = state["epoch"], state["bad_epochs"], state["best_f1"]
        self.best_state = state["best_state"]


def fit_probe(cfg: ProbeConfig, train: ProbeData, valid: ProbeData, classes: tuple[str, ...],
              on_epoch: Callable[[dict], None] | None = None) -> ProbeTrainer:
    """Train until `cfg.epochs` or early stopping; `trainer.best_model()` is the result."""
    trainer = ProbeTrainer(cfg, train, valid, classes)
    while not trainer.done:
        metrics = trainer.run_epoch()
        if on_epoch:
            on_epoch(metrics)
    return trainer


def evaluate_probe(model: nn.Module, data: ProbeData, mode: str, classes: tuple[str, ...],
                   audio_features: str = "embedding") -> dict:
    pred, _ = predict(model, features(data, mode, audio_features))
    return classification_metrics(data.labels, pred, classes)


# -------------------------------------------------------------------------------------------------
# export


def save_probe(uri: str, model: ProbeMLP, cfg: ProbeConfig, classes: tuple[str, ...]) -> None:
    """OUTPUT/probe.pt (state dict) and OUTPUT/probe.json (config, classes, input size); local or s3://."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.put_atomic(storage.join(uri, "probe.pt"), buf.getvalue())
    meta = {"config": dataclasses.asdict(cfg), "classes": list(classes), "in_dim": model.in_dim,
            "mix_layers": model.mix_layers, "layer_dim": model.layer_dim}
    storage.put_atomic(storage.join(uri, "probe.json"), json.dumps(meta, indent=2).encode())


def load_probe(uri: str) -> tuple[ProbeMLP, ProbeConfig, tuple[str, ...]]:
    meta = json.loads(storage.read_bytes(storage.join(uri, "probe.json")))
    cfg = ProbeConfig(**{**meta["config"], "hidden": tuple(meta["config"]["hidden"])})
    model = ProbeMLP(meta["in_dim"], cfg.hidden, len(meta["classes"]), cfg.dropout,
                     mix_layers=meta.get("mix_layers", 0), layer_dim=meta.get("layer_dim", 0))
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, "probe.pt"))), weights_only=True)
    model.load_state_dict(state)
    return model.eval(), cfg, tuple(meta["classes"])
