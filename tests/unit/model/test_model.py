"""ClapModel: every registered architecture builds (shrunk, offline), round-trips, and rejects bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.encoders.text import TextEncoder, build_text_backbone, byte_level_tokenizer

OFFLINE_TEXT = ["text_encoder.pretrained=null", "text_encoder.tokenizer=bytes",
                "text_encoder.hf_config.hidden_size=32", "text_encoder.hf_config.num_hidden_layers=1",
                "text_encoder.hf_config.num_attention_heads=2", "text_encoder.hf_config.intermediate_size=64",
                "text_encoder.hf_config.vocab_size=300"]
SHRINK = {
    "tiny": [],
    "htsat-tiny-roberta": OFFLINE_TEXT + ["audio_encoder.spec_size=64", "audio_encoder.depths=[1,1]",
                                          "audio_encoder.num_attention_heads=[2,2]", "audio_encoder.window_size=4",
                                          "audio_encoder.patch_embeds_hidden_size=16", "audio.clip_seconds=0.6"],
    "cnn14-bert": OFFLINE_TEXT + ["audio_encoder.channels=[4,8,8,8,8,16]", "audio_encoder.embed_dim=32",
                                  "audio.clip_seconds=0.5"],
    "clara-perceiver": OFFLINE_TEXT + ["audio_encoder.conv_channels=16", "audio_encoder.num_latents=8",
                                       "audio_encoder.latent_dim=16", "audio_encoder.self_layers=1",
                                       "audio_encoder.self_heads=2", "audio.clip_seconds=0.5"],
}


def small_model(name: str) -> ClapModel:
    torch.manual_seed(0)
    return ClapModel(get_model_config(name, SHRINK[name])).eval()


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_architecture_forward_and_save_load_round_trip(name, tmp_path):
    model = small_model(name)
    waves = torch.randn(3, 30_000) * 0.1
    batch = model.tokenize(["a dog barks", "rain on a tin roof", "ein Hund bellt"])
    with torch.no_grad():
        out = model(waves, **batch)
    d = model.config.embed_dim
    assert out["audio_embeds"].shape == (3, d) and out["text_embeds"].shape == (3, d)
    assert torch.allclose(out["audio_embeds"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["logits_per_text"], out["logits_per_audio"].T * out["logit_scale_text"]
                          / out["logit_scale"], atol=1e-4)
    model.save_pretrained(tmp_path)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.rglob("*"))
    loaded = ClapModel.from_pretrained(tmp_path)
    with torch.no_grad():
        again = loaded(waves, **loaded.tokenize(["a dog barks", "rain on a tin roof", "ein Hund bellt"]))
    assert torch.equal(again["audio_embeds"], out["audio_embeds"])
    assert torch.equal(again["text_embeds"], out["text_embeds"])
    # from_pretrained skips random init: the buffers it does not read (mel filterbank, position ids) are built
    assert [n for n, _ in loaded.named_buffers()] == [n for n, _ in model.named_buffers()]
    for (name, built), (_, original) in zip(loaded.named_buffers(), model.named_buffers()):
        assert torch.equal(built, original), name


def test_tiny_is_a_few_hundred_thousand_parameters():
    n = sum(p.numel() for p in ClapModel(get_model_config("tiny")).parameters())
    assert 50_000 < n < 1_000_000


def test_htsat_trains_with_laion_clap_regularisation():
    """LAION-CLAP's HTS-AT tiny: no dropout after the Swin MLPs, stochastic depth rising to 0.1 over the blocks."""
    model = ClapModel(get_model_config("htsat-tiny-roberta", SHRINK["htsat-tiny-roberta"][:5]))
    swin = model.audio_encoder.model
    dropouts = {name: m.p for name, m in swin.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert dropouts and not any(dropouts.values()), dropouts
    drop_paths = [m.drop_prob for m in swin.modules() if type(m).__name__ == "ClapDropPath"]
    assert drop_paths == pytest.approx(torch.linspace(0, 0.1, 12)[1:].tolist())  # 2+2+6+2 blocks, the first 0
    model.train()  # and it draws per clip: two passes differ in training, not in eval
    mel = torch.randn(2, 1, 1001, 64)
    assert not torch.equal(model.audio_encoder(mel), model.audio_encoder(mel))
    model.eval()
    assert torch.equal(model.audio_encoder(mel), model.audio_encoder(mel))


def test_per_modality_temperature_scales_each_direction():
    model = small_model("clara-perceiver")
    with torch.no_grad():
        model.logit_scale.log_scale.copy_(torch.log(torch.tensor([10.0, 20.0])))
        out = model(torch.randn(2, 24_000), **model.tokenize(["a", "b"]))
    sim = out["audio_embeds"] @ out["text_embeds"].T
    assert torch.allclose(out["logits_per_audio"], 10 * sim, atol=1e-4)
    assert torch.allclose(out["logits_per_text"], 20 * sim.T, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (lambda m: m.encode_audio(torch.zeros(1, 1000), sample_rate=16_000), "48000 Hz, got 16000"),
    (lambda m: m.encode_audio(torch.zeros(1, 0)), "empty"),
    (lambda m: m.encode_audio(torch.full((1, 100), float("nan"))), "NaN"),
    (lambda m: m.encode_audio(torch.zeros(2, 3, 4)), "shape"),
    (lambda m: m.encode_audio(torch.zeros(1, 10, dtype=torch.int16)), "floating point"),
    (lambda m: m.encode_text(torch.ones(1, 97, dtype=torch.long)), "at most 96"),
    (lambda m: m.encode_text(torch.full((1, 5), 10_000)), "token ids must lie in"),
    (lambda m: m.tokenize("not a list"), "list of strings"),
])
def test_bad_input_raises_a_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad(small_model("tiny"))


def test_frozen_text_encoder_gets_no_gradient_and_stays_in_eval():
    model = ClapModel(get_model_config("tiny", ["text_encoder.frozen=true"])).train()
    assert not model.text_encoder.training and model.audio_encoder.training
    out = model(torch.randn(2, 20_000), **model.tokenize(["x", "y"]))
    out["logits_per_audio"].sum().backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert all(p.grad is not None for p in model.audio_projection.parameters())


def test_gpt2_last_token_pooling_ignores_right_padding():
    tok = byte_level_tokenizer(32)
    backbone = build_text_backbone(None, {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2,
                                          "n_positions": 32}, tok)
    enc = TextEncoder(backbone, "last").eval()
    batch = tok(["hi", "hello there"], padding=True, return_tensors="pt")
    single = tok(["hi"], return_tensors="pt")
    with torch.no_grad():
        both = enc(batch["input_ids"], batch["attention_mask"])
        alone = enc(single["input_ids"], single["attention_mask"])
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def test_mean_max_pooling_doubles_width_and_ignores_padding():
    tok = byte_level_tokenizer(32)
    backbone = build_text_backbone(None, {"model_type": "xlm-roberta", "hidden_size": 16, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "intermediate_size": 32}, tok)
    enc = TextEncoder(backbone, "mean_max").eval()
    assert enc.out_dim == 32
    batch = tok(["über", "a much longer caption"], padding=True, return_tensors="pt")
    with torch.no_grad():
        both = enc(batch["input_ids"], batch["attention_mask"])
        alone = enc(**{k: v for k, v in tok(["über"], return_tensors="pt").items() if k != "token_type_ids"})
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def test_importing_clap_core_does_not_import_ray():
    code = ("import sys, clap_core, clap_core.model.clap, clap_core.train.loss, clap_core.eval.metrics, clap_core.model.laion; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "False"


def test_public_exports_resolve_and_import_laion_clap_is_from_laion():
    import clap_core

    assert clap_core.import_laion_clap == ClapModel.from_laion  # the historical name of the LAION import
    assert all(getattr(clap_core, name) is not None for name in clap_core.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        clap_core.nope


def test_text_encoder_and_tokenizer_load_from_a_local_pretrained_folder(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    tok = byte_level_tokenizer(64)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, pad_token_id=tok.pad_token_id))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    model = ClapModel(get_model_config("tiny", [f"text_encoder.pretrained={tmp_path / 'bert'}",
                                                f"text_encoder.tokenizer={tmp_path / 'bert'}"]))
    loaded = model.text_encoder.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in bert.state_dict().items())
    assert model.tokenize(["hello"])["input_ids"].tolist() == [tok(["hello"])["input_ids"][0]]
