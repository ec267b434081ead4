"""Shard rows -> model batches: FLAC decode, crop/pad with real lengths, caption choice, tokenization."""
from __future__ import annotations

import pickle

import numpy as np
import torch

from clap_core.audio.codec import TARGET_SR, encode_flac
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.train.batching import PairBatchTransform, crop_or_pad, pick_captions, trim_padding


def ramp(seconds: float) -> np.ndarray:
    n = int(seconds * TARGET_SR)
    return (np.arange(n) / n * 0.5).astype(np.float32)  # each sample tells its position


def rows(seconds: list[float]) -> dict[str, np.ndarray]:
    audio = np.array([encode_flac(ramp(s), TARGET_SR, "PCM_24") for s in seconds], dtype=object)
    captions = np.empty(len(seconds), dtype=object)
    captions[:] = [np.array([f"clip {i} main", f"clip {i} other"], dtype=object) for i in range(len(seconds))]
    return {"audio": audio, "captions": captions, "caption": np.array([f"clip {i} main" for i in range(len(seconds))])}


def test_shapes_lengths_and_padding():
    cfg = get_model_config("tiny")  # 2 s clips
    transform = PairBatchTransform.for_model(cfg, training=True, seed=0)
    batch = transform(rows([0.5, 2.0, 3.5]))
    clip = int(cfg.audio.clip_seconds * TARGET_SR)
    assert batch["waves"].shape == (3, clip) and batch["waves"].dtype == np.float32
    assert batch["lengths"].tolist() == [TARGET_SR // 2, clip, clip]
    assert not batch["waves"][0, TARGET_SR // 2:].any()  # short clip: zero tail, the model repeat-pads it
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, cfg.text_encoder.max_length)
    assert batch["input_ids"].dtype == np.int64


def test_random_crop_in_training_centre_crop_in_eval():
    cfg = get_model_config("tiny")
    source = ramp(3.5)
    train = PairBatchTransform.for_model(cfg, training=True, seed=1)
    starts = {int(np.argmin(np.abs(source - train(rows([3.5]))["waves"][0, 0]))) for _ in range(8)}
    assert len(starts) > 1  # a different window each call (each epoch)
    wave, n = crop_or_pad(source, 96_000, None)
    assert n == 96_000 and wave[0] == source[(len(source) - 96_000) // 2]
    evaluation = PairBatchTransform.for_model(cfg, training=False)
    np.testing.assert_allclose(evaluation(rows([3.5]))["waves"][0], wave, atol=1e-6)


def test_caption_choice():
    rng = np.random.default_rng(0)
    options = [["a", "b", "c"]] * 200
    picked = pick_captions(options, None, rng)
    assert set(picked) == {"a", "b", "c"}
    assert pick_captions(options[:3], None, None) == ["a", "a", "a"]  # eval: the main caption
    assert pick_captions([[], None], ["main0", "main1"], rng) == ["main0", "main1"]


def test_tokens_match_the_model_and_trim():
    cfg = get_model_config("tiny")
    model = ClapModel(cfg)
    transform = PairBatchTransform.for_model(cfg, training=False)
    batch = transform(rows([1.0, 1.0]))
    ids, mask = trim_padding(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
    want = model.tokenize(["clip 0 main", "clip 1 main"])
    torch.testing.assert_close(ids, want["input_ids"])
    torch.testing.assert_close(mask, want["attention_mask"])


def test_transform_pickles_without_its_tokenizer():
    transform = PairBatchTransform.for_model(get_model_config("tiny"))
    transform(rows([1.0]))  # builds the tokenizer
    clone = pickle.loads(pickle.dumps(transform))
    assert clone._tokenizer is None and clone.clip_samples == transform.clip_samples
    assert clone(rows([1.0]))["waves"].shape == (1, transform.clip_samples)
