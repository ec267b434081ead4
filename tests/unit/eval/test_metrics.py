import numpy as np
import pytest
import torch

from clap_core.eval.metrics import (
    DEFAULT_TEMPLATES,
    format_templates,
    retrieval_metrics,
    zero_shot_classifier,
    zero_shot_metrics,
    zero_shot_predict,
)

# 3 audios x 6 captions, 2 captions each. With audio_emb = I, text_emb @ audio_emb.T is
# SIMILARITY itself (rows = captions, columns = audios), so every rank can be read off.
TEXT_TO_AUDIO = np.array([0, 0, 1, 1, 2, 2])
SIMILARITY = np.array(
    [
        [0.9, 0.1, 0.2],  # c0 -> a0: best                                 t2a rank 1
        [0.3, 0.5, 0.1],  # c1 -> a0: a1 higher                            t2a rank 2
        [0.2, 0.8, 0.4],  # c2 -> a1: best                                 t2a rank 1
        [0.6, 0.2, 0.7],  # c3 -> a1: a0, a2 higher                        t2a rank 3
        [0.1, 0.3, 0.3],  # c4 -> a2: tied with a1, lower index wins       t2a rank 2
        [0.0, 0.4, 0.5],  # c5 -> a2: best                                 t2a rank 1
    ],
    dtype=np.float32,
)
# a2t, reading columns:
#   a0: c0 .9, c3 .6, c1 .3, c2 .2, c4 .1, c5 0  -> relevant c0@1, c1@3: best 1, AP = (1/1 + 2/3)/2 = 5/6
#   a1: c2 .8, c1 .5, c5 .4, c4 .3, c3 .2, c0 .1 -> relevant c2@1, c3@5: best 1, AP = (1/1 + 2/5)/2 = 7/10
#   a2: c3 .7, c5 .5, c2 .4, c4 .3, c0 .2, c1 .1 -> relevant c5@2, c4@4: best 2, AP = (1/2 + 2/4)/2 = 1/2
EXPECTED = {
    # t2a ranks [1, 2, 1, 3, 2, 1]
    "t2a/R@1": 3 / 6,
    "t2a/R@5": 1.0,
    "t2a/R@10": 1.0,
    "t2a/mAP@10": (1 + 1 / 2 + 1 + 1 / 3 + 1 / 2 + 1) / 6,  # 13/18
    "t2a/mean_rank": 10 / 6,
    "t2a/median_rank": 1.5,
    # a2t best ranks [1, 1, 2]
    "a2t/R@1": 2 / 3,
    "a2t/R@5": 1.0,
    "a2t/R@10": 1.0,
    "a2t/mAP@10": (5 / 6 + 7 / 10 + 1 / 2) / 3,  # 61/90
    "a2t/mean_rank": 4 / 3,
    "a2t/median_rank": 1.0,
}


def test_retrieval_metrics_hand_computed_example():
    metrics = retrieval_metrics(np.eye(3, dtype=np.float32), SIMILARITY, TEXT_TO_AUDIO)
    assert set(metrics) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value), key


def test_retrieval_metrics_accepts_torch_tensors():
    metrics = retrieval_metrics(torch.eye(3), torch.from_numpy(SIMILARITY), torch.from_numpy(TEXT_TO_AUDIO))
    assert metrics["a2t/mAP@10"] == pytest.approx(61 / 90)


def _random_unit(rows, dim, seed):
    emb = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_perfect_embeddings_give_perfect_scores():
    audio = _random_unit(5, 16, seed=0)
    text_to_audio = np.repeat(np.arange(5), 3)
    metrics = retrieval_metrics(audio, audio[text_to_audio], text_to_audio)
    for prefix in ("t2a", "a2t"):
        assert metrics[f"{prefix}/R@1"] == 1.0
        assert metrics[f"{prefix}/mAP@10"] == pytest.approx(1.0)
        assert metrics[f"{prefix}/mean_rank"] == 1.0


def test_ties_rank_lower_index_first():
    # all audios identical: caption i (true audio i) sees i tied audios with smaller index
    audio = np.ones((3, 2), dtype=np.float32)
    text = np.ones((3, 2), dtype=np.float32)
    metrics = retrieval_metrics(audio, text, np.array([0, 1, 2]))
    # t2a ranks [1, 2, 3]; a2t: all captions tie, audio a's caption a has rank a + 1
    for prefix in ("t2a", "a2t"):
        assert metrics[f"{prefix}/R@1"] == pytest.approx(1 / 3)
        assert metrics[f"{prefix}/mean_rank"] == 2.0
        assert metrics[f"{prefix}/mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_ap_counts_only_top_10_and_normalises_by_min_relevant_10():
    # one audio with 12 captions, 1 distractor audio; caption sims for audio 0 are all
    # distinct and higher than the distractor's, so captions rank 1..12 -> AP@10 = 10/10
    audio = np.eye(2, dtype=np.float32)
    text = np.stack([np.linspace(1.0, 0.5, 12), np.zeros(12)], axis=1).astype(np.float32)
    metrics = retrieval_metrics(audio, text, np.zeros(12, dtype=np.int64))
    assert metrics["a2t/mAP@10"] == pytest.approx(1.0)  # audio 1 has no caption: left out
    assert metrics["a2t/R@1"] == 1.0


def test_chunked_equals_unchunked():
    audio = _random_unit(20, 8, seed=1)
    text = _random_unit(60, 8, seed=2)
    text_to_audio = np.random.default_rng(3).integers(0, 20, size=60)
    full = retrieval_metrics(audio, text, text_to_audio, chunk_size=10_000)
    for chunk_size in (1, 7, 32):
        assert retrieval_metrics(audio, text, text_to_audio, chunk_size=chunk_size) == full


def test_zero_shot_classifier_averages_normalised_templates():
    class_text = np.array(
        [
            [[2.0, 0.0], [0.0, 1.0]],  # normalised to [1, 0] and [0, 1] before averaging
            [[0.0, 3.0], [0.0, 3.0]],
        ]
    )
    classifier = zero_shot_classifier(class_text)
    np.testing.assert_allclose(classifier, [[2**-0.5, 2**-0.5], [0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(zero_shot_classifier(np.array([[3.0, 4.0]])), [[0.6, 0.8]], rtol=1e-6)


def test_zero_shot_predict_is_scaled_softmax():
    classifier = np.eye(3, dtype=np.float32)
    audio = np.array([[2.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=np.float32)  # normalised inside
    probs = zero_shot_predict(audio, classifier, logit_scale=10.0)
    logits = 10.0 * np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)


def test_zero_shot_metrics_hand_example():
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # true 0, predicted 0
            [0.2, 0.5, 0.3],  # true 0, predicted 1
            [0.1, 0.8, 0.1],  # true 1, predicted 1
            [0.4, 0.4, 0.2],  # true 1, tie -> lower index: predicted 0
            [0.1, 0.2, 0.7],  # true 2, predicted 2
        ]
    )
    metrics = zero_shot_metrics(probs, np.array([0, 0, 1, 1, 2]), ["dog", "rain", "siren"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["per_class_accuracy"] == pytest.approx({"dog": 0.5, "rain": 0.5, "siren": 1.0})
    assert metrics["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert "top5_accuracy" not in metrics


def test_zero_shot_top5_accuracy():
    probs = np.tile(np.arange(6, 0, -1, dtype=np.float64), (2, 1))  # class 0 best ... class 5 worst
    metrics = zero_shot_metrics(probs, np.array([4, 5]), [f"c{i}" for i in range(6)])
    assert metrics["accuracy"] == 0.0
    assert metrics["top5_accuracy"] == 0.5  # class 4 is 5th, class 5 is 6th
    assert metrics["per_class_accuracy"] == {"c4": 0.0, "c5": 0.0}


def test_format_templates():
    assert format_templates(DEFAULT_TEMPLATES, "dog barking") == ["This is a sound of dog barking."]
    assert format_templates(["{label} {x}"], "rain") == ["rain {x}"]


def _argsort_reference(audio, text, text_to_audio):
    """Naive metrics from full stable argsorts, for comparison."""
    scores = text @ audio.T  # (Nt, Na)
    t2a_order = np.argsort(-scores, axis=1, kind="stable")
    t2a_ranks = np.array([np.where(row == a)[0][0] + 1 for row, a in zip(t2a_order, text_to_audio)])
    a2t_order = np.argsort(-scores.T, axis=1, kind="stable")
    best, ap = [], []
    for a, row in enumerate(a2t_order):
        relevant = np.isin(row, np.where(text_to_audio == a)[0])
        if relevant.any():
            hits = np.cumsum(relevant[:10])
            ap.append(np.sum(relevant[:10] * hits / np.arange(1, 11)) / min(relevant.sum(), 10))
            best.append(np.argmax(relevant) + 1)
    return {
        "t2a/R@1": np.mean(t2a_ranks <= 1),
        "t2a/R@5": np.mean(t2a_ranks <= 5),
        "t2a/mAP@10": np.mean(np.where(t2a_ranks <= 10, 1 / t2a_ranks, 0)),
        "t2a/median_rank": np.median(t2a_ranks),
        "a2t/R@1": np.mean(np.array(best) <= 1),
        "a2t/R@5": np.mean(np.array(best) <= 5),
        "a2t/mAP@10": np.mean(ap),
        "a2t/mean_rank": np.mean(best),
    }


def test_matches_argsort_reference_with_many_ties():
    rng = np.random.default_rng(4)
    audio = rng.integers(-1, 2, size=(15, 3)).astype(np.float32)  # few distinct values: many ties
    text = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    text_to_audio = rng.integers(0, 12, size=40)  # audios 12..14 are caption-less distractors
    metrics = retrieval_metrics(audio, text, text_to_audio, chunk_size=9)
    for key, value in _argsort_reference(audio, text, text_to_audio).items():
        assert metrics[key] == pytest.approx(value), key
