"""Shard rows -> model batches: FLAC decode, crop/pad with real lengths, caption choice, tokenization."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clap_core.audio.codec import TARGET_SR, encode_flac
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.encoders.text import build_tokenizer
from clap_core.train.batching import FixedLengthTokens, PairBatchTransform, crop_or_pad, pick_captions, trim_padding

REPO = Path(__file__).resolve().parents[3]


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


def test_each_row_carries_the_key_of_its_source_clip():
    """An augmented copy ("<id>#aug<k>") has its source's key, a segment ("<id>#seg<i>") and another clip their
    own; a row that does not decode takes its key with it; the key is the same in another process."""
    transform = PairBatchTransform.for_model(get_model_config("tiny"), training=True, seed=0)
    batch = rows([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    batch["id"] = np.array(["a", "a#aug1", "a#aug12", "a#seg1", "a#seg1#aug2", "b"], dtype=object)
    batch["audio"][1] = b"not flac"  # rejected: its key leaves with it
    keys = transform(batch)["clip_key"]
    assert keys.dtype == np.int64 and keys.shape == (5,)
    a, a12, seg, seg_aug, b = keys.tolist()
    assert a == a12 and seg == seg_aug and len({a, seg, b}) == 3
    code = "from clap_core.train.batching import clip_keys; print(clip_keys(['a#aug3'])[0])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert int(other.stdout) == a  # blake2b, not the salted hash(): every decode task agrees
    assert "clip_key" not in transform(rows([0.5]))  # no id column, no key


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
    shipped = pickle.loads(pickle.dumps(transform.ship_tokenizer()))  # the backend travels as JSON, parsed on use
    assert shipped._tokenizer is None and shipped.tokens._backend is None
    for key, value in clone.tokenize(["a dog", "rain"]).items():
        np.testing.assert_array_equal(shipped.tokenize(["a dog", "rain"])[key], value)


TEXTS = ["", "a dog", "  Glas zerbricht auf Stein — 玻璃碎了 🐕  ", "the sound of " * 20, "Rain.\nThunder!"]


def bpe_tokenizer_folder(tmp_path: Path, kind: str) -> str:
    """A RoBERTa- or GPT-2-style tokenizer (byte-level BPE trained here on a few lines), saved as transformers
    saves one: what `text_encoder.tokenizer=<folder>` loads. RoBERTa: <s> ... </s>, a pad token; GPT-2: no special
    tokens around the text and no pad token (build_tokenizer pads with EOS)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=kind == "roberta")
    bpe.train_from_iterator(["a dog barks", "the sound of rain on a roof", "glass breaking"] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<|endoftext|>"])
    backend = bpe._tokenizer  # the `tokenizers.Tokenizer` inside
    if kind == "roberta":
        backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                              ("<s>", backend.token_to_id("<s>")))
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    else:
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(tmp_path / kind)
    return str(tmp_path / kind)


@pytest.mark.parametrize("kind", ["bytes", "roberta", "gpt2"])
def test_fixed_length_tokens_equal_the_transformers_tokenizer(kind, tmp_path):
    name = kind if kind == "bytes" else bpe_tokenizer_folder(tmp_path, kind)
    max_length = 12  # the long captions are truncated, the short ones padded
    tokenizer = build_tokenizer(name, max_length)
    tokens = pickle.loads(pickle.dumps(FixedLengthTokens.from_tokenizer(tokenizer, max_length)))  # as a task gets it
    assert tokenizer.backend_tokenizer.padding is None  # the model's own tokenizer is left alone (a copy was set)
    want = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    got = tokens(TEXTS)
    assert got["input_ids"].dtype == got["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    lengths = got["attention_mask"].sum(1)
    assert lengths[1] < max_length == lengths[3] and len(set(got["input_ids"][:, 1])) > 2  # padded, truncated, real
    assert tokens([])["input_ids"].shape == (0, max_length)


def test_a_decode_task_loads_neither_torch_nor_transformers(tmp_path):
    """What a Ray Data task does with the training transform: unpickle it, call it on shard rows."""
    transform = PairBatchTransform.for_model(get_model_config("tiny"), training=True, seed=0).ship_tokenizer()
    (tmp_path / "transform.pkl").write_bytes(pickle.dumps(transform))
    (tmp_path / "rows.pkl").write_bytes(pickle.dumps(rows([0.5, 1.0])))
    code = ("import pickle, sys\n"
            f"transform = pickle.loads(open({str(tmp_path / 'transform.pkl')!r}, 'rb').read())\n"
            f"batch = transform(pickle.loads(open({str(tmp_path / 'rows.pkl')!r}, 'rb').read()))\n"
            "print(batch['input_ids'].tolist(), [m for m in ('torch', 'transformers') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ids, loaded = out.stdout.strip().rsplit(" [", 1)
    assert loaded == "]", f"the decode task loaded {loaded}"
    expected = transform(rows([0.5, 1.0]))["input_ids"]  # the seed fixes the caption choice
    assert ids == str(expected.tolist())
