"""Evaluation metrics: audio-text retrieval (AudioCaps/Clotho protocol), zero-shot classification and the
classification metrics of a probe (accuracy, weighted/macro F1), with the L2 normalisation and confusion
matrix they share.

Everything runs in numpy on CPU; torch tensors are accepted and converted.

Tie rule used everywhere: candidates are ordered by descending score, ties broken by
ascending index (a stable sort). The 1-based rank of candidate j in a row of scores s is
therefore 1 + #{k : s_k > s_j} + #{k < j : s_k == s_j}, which needs no argsort.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_TEMPLATES = ["This is a sound of {label}."]
RECALL_KS = (1, 5, 10)
MAP_K = 10


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _float_array(array) -> np.ndarray:
    array = _to_numpy(array)
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float32)


def l2_normalize(array: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis (an all-zero vector stays zero)."""
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: rows are the true class, columns the predicted class."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return confusion


def _target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of column targets[i] in row i of scores (R, N), with the tie rule."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]  # (R, 1)
    higher = (scores > target_scores).sum(axis=1)  # (R,)
    tied_before = ((scores == target_scores) & (np.arange(scores.shape[1]) < targets[:, None])).sum(axis=1)
    return 1 + higher + tied_before


def _text_to_audio_ranks(audio_emb, text_emb, text_to_audio, chunk_size) -> np.ndarray:
    ranks = np.empty(len(text_emb), dtype=np.int64)  # (Nt,)
    for start in range(0, len(text_emb), chunk_size):
        rows = slice(start, start + chunk_size)
        scores = text_emb[rows] @ audio_emb.T  # (chunk, Na)
        ranks[rows] = _target_ranks(scores, text_to_audio[rows])
    return ranks


def _caption_ranks_in_audio_rows(audio_emb, text_emb, text_to_audio, chunk_size) -> np.ndarray:
    """Rank of each caption within the caption ranking of its own audio, shape (Nt,)."""
    ranks = np.empty(len(text_emb), dtype=np.int64)
    for start in range(0, len(text_emb), chunk_size):
        captions = np.arange(start, min(start + chunk_size, len(text_emb)))  # (chunk,)
        audios, rows = np.unique(text_to_audio[captions], return_inverse=True)
        scores = audio_emb[audios] @ text_emb.T  # (n_audios, Nt), each audio row computed once
        ranks[captions] = _target_ranks(scores[rows], captions)  # (chunk,)
    return ranks


def _average_precision_at_k(caption_ranks, text_to_audio, num_audio, k) -> np.ndarray:
    """AP@k per audio from the ranks of its relevant captions, shape (num_audio,)."""
    order = np.lexsort((caption_ranks, text_to_audio))  # by audio, then rank
    audio_of, rank_of = text_to_audio[order], caption_ranks[order]
    group_start = np.searchsorted(audio_of, audio_of, side="left")
    hits_so_far = np.arange(len(order)) - group_start + 1  # relevant captions at or above this rank
    precision = np.where(rank_of <= k, hits_so_far / rank_of, 0.0)
    num_relevant = np.bincount(text_to_audio, minlength=num_audio)
    summed = np.bincount(audio_of, weights=precision, minlength=num_audio)
    return summed / np.maximum(np.minimum(num_relevant, k), 1)


def _rank_summary(prefix: str, ranks: np.ndarray, average_precision: np.ndarray) -> dict[str, float]:
    metrics = {f"{prefix}/R@{k}": float(np.mean(ranks <= k)) for k in RECALL_KS}
    metrics[f"{prefix}/mAP@{MAP_K}"] = float(np.mean(average_precision))
    metrics[f"{prefix}/mean_rank"] = float(np.mean(ranks))
    metrics[f"{prefix}/median_rank"] = float(np.median(ranks))
    return metrics


def retrieval_metrics(audio_emb, text_emb, text_to_audio, chunk_size: int = 256) -> dict[str, float]:
    """Text->audio (t2a) and audio->text (a2t) retrieval with several captions per audio.

    audio_emb (Na, D) and text_emb (Nt, D) are assumed L2-normalised; similarity is the dot
    product. text_to_audio (Nt,) gives the index of each caption's audio. Ranks are 1-based
    and use the module's tie rule (descending similarity, then ascending index).

    t2a: each caption has one relevant audio, of rank r. R@k = fraction of captions with
    r <= k; mAP@10 = mean of 1/r if r <= 10 else 0; mean/median rank over captions.
    a2t: each audio is scored against all captions and its own captions are relevant.
    R@k = fraction of audios with at least one relevant caption in the top k; the audio's
    rank is the best (smallest) rank of its captions, for mean/median rank; mAP@10 = mean
    over audios of AP@10 = 1/min(n_rel, 10) * sum over the positions k <= 10 that hold a
    relevant caption of precision@k. Audios without any caption are left out of a2t.

    Scores are computed chunk_size captions at a time, so memory is O(chunk_size * max(Na, Nt)).
    """
    audio_emb, text_emb = _float_array(audio_emb), _float_array(text_emb)
    text_to_audio = _to_numpy(text_to_audio).astype(np.int64)
    num_audio = len(audio_emb)

    t2a_ranks = _text_to_audio_ranks(audio_emb, text_emb, text_to_audio, chunk_size)  # (Nt,)
    t2a_precision = np.where(t2a_ranks <= MAP_K, 1.0 / t2a_ranks, 0.0)

    caption_ranks = _caption_ranks_in_audio_rows(audio_emb, text_emb, text_to_audio, chunk_size)  # (Nt,)
    best_rank = np.full(num_audio, np.iinfo(np.int64).max)
    np.minimum.at(best_rank, text_to_audio, caption_ranks)
    has_caption = np.bincount(text_to_audio, minlength=num_audio) > 0
    a2t_precision = _average_precision_at_k(caption_ranks, text_to_audio, num_audio, MAP_K)

    return {
        **_rank_summary("t2a", t2a_ranks, t2a_precision),
        **_rank_summary("a2t", best_rank[has_caption], a2t_precision[has_caption]),
    }


def format_templates(templates: Sequence[str], label: str) -> list[str]:
    """Fill `{label}` in each template (plain replace, so other braces are left alone)."""
    return [template.replace("{label}", label) for template in templates]


def zero_shot_classifier(class_text_emb) -> np.ndarray:
    """(C, T, D) or (C, D) text embeddings -> (C, D) unit class vectors (CLIP prompt ensembling).

    Each template embedding is L2-normalised, averaged over the T templates, then renormalised.
    """
    emb = _float_array(class_text_emb)
    if emb.ndim == 2:
        emb = emb[:, None, :]  # (C, 1, D)
    return l2_normalize(l2_normalize(emb).mean(axis=1))  # (C, D)


def zero_shot_predict(audio_emb, classifier, logit_scale: float = 100.0) -> np.ndarray:
    """Class probabilities (N, C): softmax(logit_scale * normalize(audio) @ classifier.T)."""
    logits = logit_scale * l2_normalize(_float_array(audio_emb)) @ _float_array(classifier).T  # (N, C)
    logits = logits - logits.max(axis=1, keepdims=True)  # numerical stability
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def zero_shot_metrics(probs, labels, class_names: Sequence[str]) -> dict:
    """Accuracy metrics of (N, C) class probabilities against (N,) integer labels.

    Keys: accuracy, top5_accuracy (only when C >= 5), per_class_accuracy {name: accuracy}
    (classes without samples are left out), confusion_matrix (C x C nested lists of counts,
    rows = true class, columns = predicted class). Ties follow the module's tie rule.
    """
    probs = _float_array(probs)
    labels = _to_numpy(labels).astype(np.int64)
    num_classes = probs.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")

    ranks = _target_ranks(probs, labels)  # (N,)
    predicted = np.argmax(probs, axis=1)  # first maximum, consistent with the tie rule
    confusion = confusion_matrix(labels, predicted, num_classes)
    support = confusion.sum(axis=1)

    metrics = {
        "accuracy": float(np.mean(ranks == 1)),
        "per_class_accuracy": {
            name: float(confusion[c, c] / support[c]) for c, name in enumerate(class_names) if support[c] > 0
        },
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes >= 5:
        metrics["top5_accuracy"] = float(np.mean(ranks <= 5))
    return metrics


def classification_metrics(y_true, y_pred, classes: Sequence[str]) -> dict:
    """Accuracy, weighted/macro F1 (over the classes present in y_true or y_pred, as scikit-learn), per-class F1."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    confusion = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    present = (support + predicted) > 0
    n = max(len(y_true), 1)
    return {"accuracy": float(tp.sum() / n),
            "weighted_f1": float((f1 * support).sum() / n),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class_f1": {c: float(f1[i]) for i, c in enumerate(classes)},
            "support": {c: int(support[i]) for i, c in enumerate(classes)},
            "confusion": confusion.tolist(),
            "num_examples": int(len(y_true))}
