"""The MELD probe: metrics against scikit-learn, training with early stopping, exact resume, export, config."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from clap_core.config import ConfigError
from clap_core.data.meld import EMOTIONS
from clap_core.eval.metrics import classification_metrics
from clap_core.eval.plots import confusion_png
from clap_core.eval.probe import (
    ProbeData,
    ProbeTrainer,
    evaluate_probe,
    features,
    fit_probe,
    inverse_frequency_weights,
    load_embeddings,
    load_probe,
    majority_baseline,
    save_probe,
)
from clap_core.eval.probe_config import ProbeConfig, load_probe_sweep_config, with_params

torch.set_num_threads(1)
CLASSES = ("a", "b", "c", "d")


def blobs(n_per_class, dim=16, seed=0, shared=5.0, counts=None) -> ProbeData:
    """Class-dependent embeddings on top of a large shared component (like a weak CLAP encoder's)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((len(CLASSES), dim))
    counts = counts or [n_per_class] * len(CLASSES)
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)]).astype(np.int64)
    common = shared * np.ones(dim)

    def emb():
        return (common + 0.5 * centers[labels] + 0.3 * rng.standard_normal((len(labels), dim))).astype(np.float32)

    return ProbeData(ids=[f"x{i}" for i in range(len(labels))], audio=emb(), text=emb(), labels=labels)


def test_metrics_match_scikit_learn_including_absent_classes():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 200)  # class 3 never occurs...
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))  # ...but is sometimes predicted
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    per_class = f1_score(y_true, y_pred, average=None, labels=range(4), zero_division=0)
    assert list(m["per_class_f1"].values()) == pytest.approx(list(per_class))
    assert np.array(m["confusion"]).sum() == 200 and m["support"]["d"] == 0


def test_majority_baseline_predicts_the_most_frequent_training_class():
    base = majority_baseline(np.array([1, 1, 1, 0, 2]), np.array([1, 0, 1, 2]), CLASSES)
    assert base["predicted_class"] == "b" and base["accuracy"] == 0.5
    assert base["weighted_f1"] == pytest.approx(f1_score([1, 0, 1, 2], [1, 1, 1, 1], average="weighted"))


def test_features_normalise_each_modality_and_concatenate():
    data = blobs(3)
    concat, audio = features(data, "concat"), features(data, "audio")
    assert concat.shape == (12, 32) and audio.shape == (12, 16)
    assert torch.allclose(concat[:, :16].norm(dim=1), torch.ones(12)) and torch.allclose(audio, concat[:, :16])
    assert torch.allclose(features(data, "text"), concat[:, 16:])


def test_class_weights_are_inverse_frequency():
    w = inverse_frequency_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_probe_learns_and_beats_the_majority_baseline():
    train, valid, test = blobs(30, seed=1, counts=[60, 20, 20, 20]), blobs(10, seed=2), blobs(10, seed=3)
    for mode in ("concat", "audio", "text"):
        cfg = ProbeConfig(mode=mode, hidden=(32, 16), epochs=15, batch_size=16, class_weights=True, patience=15)
        trainer = fit_probe(cfg, train, valid, CLASSES)
        test_metrics = evaluate_probe(trainer.best_model(), test, mode, CLASSES)
        baseline = majority_baseline(train.labels, test.labels, CLASSES)
        assert test_metrics["weighted_f1"] > 0.9 > baseline["weighted_f1"], mode


def test_early_stopping_keeps_the_best_epoch():
    train, valid = blobs(20, seed=1), blobs(10, seed=2)
    history = []
    trainer = fit_probe(ProbeConfig(hidden=(16,), epochs=20, patience=2, batch_size=8), train, valid, CLASSES,
                        on_epoch=history.append)
    f1s = [h["val_weighted_f1"] for h in history]
    assert len(history) < 20 and trainer.bad_epochs == 2  # stopped early: two epochs without improvement
    assert trainer.best_f1 == max(f1s) and history[-1]["best_val_weighted_f1"] == max(f1s)
    assert evaluate_probe(trainer.best_model(), valid, "concat", CLASSES)["weighted_f1"] == pytest.approx(max(f1s))


def test_resuming_from_state_dict_continues_exactly():
    train, valid = blobs(20, seed=1), blobs(10, seed=2)
    cfg = ProbeConfig(hidden=(16,), epochs=6, patience=6, batch_size=8, dropout=0.3)
    straight = ProbeTrainer(cfg, train, valid, CLASSES)
    expected = [straight.run_epoch() for _ in range(6)]
    first = ProbeTrainer(cfg, train, valid, CLASSES)
    got = [first.run_epoch() for _ in range(3)]
    state = first.state_dict()
    second = ProbeTrainer(cfg, train, valid, CLASSES)
    second.load_state_dict(state)
    got += [second.run_epoch() for _ in range(3)]
    assert [g["train_loss"] for g in got] == pytest.approx([e["train_loss"] for e in expected], abs=1e-6)
    assert [g["epoch"] for g in got] == list(range(1, 7)) and second.done


def test_save_and_load_probe_predict_the_same(tmp_path):
    train, valid = blobs(10, seed=1), blobs(5, seed=2)
    cfg = ProbeConfig(mode="audio", hidden=(8,), epochs=3, batch_size=8)
    model = fit_probe(cfg, train, valid, CLASSES).best_model()
    save_probe(str(tmp_path / "best"), model, cfg, CLASSES)
    loaded, loaded_cfg, classes = load_probe(str(tmp_path / "best"))
    assert loaded_cfg == cfg and classes == CLASSES
    x = features(valid, "audio")
    assert torch.equal(loaded(x), model(x))  # the standardisation statistics travel with the weights


def test_load_embeddings_reads_splits_and_skips_rejects(tmp_path):
    from clap_core.data import embeddings

    rows = [{"id": f"{s}/{i}", "label": EMOTIONS[i % 7], "split": s, "audio_embedding": [float(i), 1.0],
             "text_embedding": [1.0, float(i)], "caption": "x"} for s in ("train", "dev") for i in range(7)]
    attempt = embeddings.claim_output(str(tmp_path), "job", {"uri": "ckpt", "identity": "abc"})["attempt"]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:9]), tmp_path / "data" / f"{attempt}_a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[9:]), tmp_path / "data" / f"{attempt}_b.parquet")
    (tmp_path / "_rejects").mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "bad", "reason": "undecodable"}]), tmp_path / "_rejects" / f"{attempt}_r.parquet")
    with pytest.raises(FileNotFoundError, match="not finished"):
        load_embeddings(str(tmp_path), EMOTIONS)
    assert embeddings.summary(embeddings.commit(str(tmp_path), attempt)) == {
        "rows": 14, "rejects": 1, "reject_reasons": {"undecodable": 1}}
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "data" / "stray.parquet")  # not in the manifest
    data = load_embeddings(str(tmp_path), EMOTIONS)
    assert sorted(data) == ["dev", "train"] and len(data["train"]) == 7
    assert data["dev"].audio.shape == (7, 2) and data["dev"].audio.dtype == np.float32
    assert [EMOTIONS[k] for k in data["train"].labels] == [EMOTIONS[int(i.split("/")[1]) % 7] for i in data["train"].ids]
    assert data["train"].audio_layers is None  # embedded without tower layers
    pq.write_table(pa.Table.from_pylist([{"id": "stray", "reason": "x"}]), tmp_path / "_rejects" / "stray.parquet")
    assert embeddings.read_rejects(str(tmp_path)).column("id").to_pylist() == ["bad"]  # only what is listed


def test_layer_matrix_unflattens_the_pooled_tower_layers():
    from clap_core.data import embeddings

    layers = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (N, L, H)
    table = pa.table({"audio_layers": [row.ravel().tolist() for row in layers], "audio_layer_count": [3, 3]})
    assert np.array_equal(embeddings.layer_matrix(table), layers)
    assert embeddings.layer_matrix(pa.table({"id": ["a"]})) is None


def test_confusion_png_is_a_png():
    png = confusion_png([[3, 1], [0, 4]], ("x", "y"), "test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_config_checks_keys_and_epoch_bound():
    with pytest.raises(ConfigError, match="tune.num_sample"):
        load_probe_sweep_config({}, ["tune.num_sample=3"])
    with pytest.raises(ConfigError, match="search.epochs"):
        load_probe_sweep_config({}, ["search.epochs=[5,40]"])
    with pytest.raises(ConfigError, match="epochs"):
        load_probe_sweep_config({}, ["probe.epochs=21"])
    cfg = with_params(ProbeConfig(), {"hidden": "256x64", "lr": 0.01, "class_weights": True})
    assert cfg.hidden == (256, 64) and cfg.lr == 0.01 and cfg.class_weights
    assert with_params(ProbeConfig(), {"hidden": "linear"}).hidden == ()


def test_weighted_layer_probe_learns_which_layer_holds_the_label(tmp_path):
    """Only layer 1 of 3 carries the class: the learned layer weights move to it, and save/load keeps them."""
    from clap_core.eval.probe import layer_layout

    rng = np.random.default_rng(0)

    def data(n):
        labels = rng.integers(0, len(CLASSES), n)
        layers = rng.normal(0, 1, (n, 3, 8)).astype(np.float32)
        layers[:, 1, :len(CLASSES)] += 3.0 * np.eye(len(CLASSES))[labels]
        noise = rng.normal(0, 1, (n, 16)).astype(np.float32)
        return ProbeData(ids=[str(i) for i in range(n)], audio=noise, text=noise, labels=labels, audio_layers=layers)

    train, valid = data(300), data(100)
    cfg = ProbeConfig(mode="audio", audio_features="weighted", hidden=(16,), epochs=10, lr=1e-2)
    assert layer_layout(cfg, train) == {"mix_layers": 3, "layer_dim": 8}
    trainer = fit_probe(cfg, train, valid, CLASSES)
    model = trainer.best_model()
    assert int(model.layer_weights.argmax()) == 1
    assert evaluate_probe(model, valid, "audio", CLASSES, "weighted")["weighted_f1"] > 0.8
    assert evaluate_probe(fit_probe(dataclasses.replace(cfg, audio_features="embedding"), train, valid, CLASSES)
                          .best_model(), valid, "audio", CLASSES)["weighted_f1"] < 0.6  # the embedding is noise here
    save_probe(str(tmp_path / "p"), model, cfg, CLASSES)
    loaded, loaded_cfg, _ = load_probe(str(tmp_path / "p"))
    x = features(valid, "audio", "weighted")
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ConfigError, match="per-layer features"):
        features(dataclasses.replace(valid, audio_layers=None), "audio", "last")
