"""`clap export --format onnx`: ONNX Runtime equals PyTorch within 1e-4, at batch sizes and caption lengths
other than the ones the graphs were exported with, and embeds files as ClapModel.embed_audio does; the int8
export quantizes exactly the linear layers and keeps cosine >= 0.999 to the fp32 model on decoded audio."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from clap_core.config import CheckpointError
from clap_core.model import onnx_export
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.frontend import crop_or_pad_tensor
from clap_core.model.onnx_export import AUDIO_FILE, META_FILE, TEXT_FILE, OnnxTowers, export_onnx, linear_matmuls
from tests.fixtures.audio import decoded_clips
from tests.fixtures.models import tiny_htsat_roberta

pytest.importorskip("onnxruntime")
CAPTIONS = ["a dog", "glass breaking on a stone floor", "a low voice speaking slowly in a large hall"]


def wav_files(folder, clips: list[np.ndarray]) -> list[str]:
    paths = [str(folder / f"clip{i}.wav") for i in range(len(clips))]
    for path, clip in zip(paths, clips):
        sf.write(path, clip, 48_000, subtype="FLOAT")
    return paths


def window_batch(model: ClapModel, clips: list[np.ndarray]) -> torch.Tensor:
    """Decoded clips cropped/padded to the model's window, as the waveform graph expects them: (B, clip_samples)."""
    return torch.stack([crop_or_pad_tensor(torch.from_numpy(c), model.frontend.clip_samples,
                                           model.frontend.pad_mode, training=False) for c in clips])


@pytest.mark.parametrize("arch,audio_input", [("htsat-roberta", "mel"), ("tiny", "waveform")])
def test_onnx_runtime_equals_pytorch(arch, audio_input, tmp_path):
    torch.manual_seed(0)
    model = tiny_htsat_roberta() if arch == "htsat-roberta" else ClapModel(get_model_config("tiny")).eval()
    towers = OnnxTowers(export_onnx(model, tmp_path, audio_input=audio_input))
    assert towers.meta["clip_samples"] == model.frontend.clip_samples
    for clips in (decoded_clips([0.4]), decoded_clips([0.7, 1.0, 2.5])):  # batch 1 and 3 (exported with 2)
        waves = window_batch(model, clips)
        with torch.no_grad():
            mel, is_longer = model.frontend(waves)
            expected = model.encode_mel(mel, is_longer).numpy()
        got = towers.encode_mel(mel.numpy(), is_longer.numpy()) if audio_input == "mel" \
            else towers.encode_waveform(waves.numpy())
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
    for captions in (CAPTIONS[:1], CAPTIONS):  # token axis dynamic too
        batch = model.tokenize(captions)
        with torch.no_grad():
            expected = model.encode_text(**batch).numpy()
        got = towers.encode_text(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
        assert np.abs(got - expected).max() < 1e-4
    # from files: decoded, windowed (2.5 s > the 1 s window of the HTS-AT: the mean of 3 windows), padded
    paths = wav_files(tmp_path, decoded_clips([0.4, 2.5, 1.0]))
    expected = model.embed_audio(paths, batch_size=2, long_audio="window_mean", precision="fp32")
    assert np.abs(towers.embed_audio(paths, batch_size=2) - expected).max() < 1e-4
    # from captions, tokenized by the tokenizer/ the export holds, in batches of 2 (padded per batch)
    expected = model.embed_text(CAPTIONS, precision="fp32")
    assert np.abs(towers.embed_text(CAPTIONS, batch_size=2) - expected).max() < 1e-4
    assert towers.embed_text([]).shape == (0, model.config.embed_dim)
    # what `clap embed` / `clap search` load from the folder; an export without its tokenizer is refused by name
    assert isinstance(onnx_export.load_embedder(tmp_path), OnnxTowers)
    shutil.rmtree(tmp_path / onnx_export.TOKENIZER_DIR)
    with pytest.raises(CheckpointError, match="predates embedding files and captions"):
        onnx_export.load_embedder(tmp_path)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / onnx_export.TOKENIZER_DIR}: missing, this export "
                                              "predates embed_text"):  # OnnxTowers opened directly
        OnnxTowers(tmp_path).embed_text(CAPTIONS)


def test_onnx_export_refuses_fused_models_and_wrong_inputs(tmp_path):
    with pytest.raises(ValueError, match="fused HTS-AT.*data-dependent"):
        export_onnx(tiny_htsat_roberta(fusion=True), tmp_path / "fused")
    with pytest.raises(ValueError, match="audio_input"):
        export_onnx(tiny_htsat_roberta(), tmp_path / "x", audio_input="spectrogram")
    assert not (tmp_path / "fused").exists()


def test_int8_export_quantizes_the_linear_layers_and_keeps_the_cosine_bound(tmp_path, capsys):
    """clap export --quantize int8: every nn.Linear that runs per patch or token becomes an int8 MatMul (the
    counts in onnx_export.json are the encoders' layer counts; the projection heads and the text pooler run once
    per clip or caption, as Gemm nodes, and stay fp32), nothing else does (the waveform graph's mel filterbank
    stays fp32), and files embed within cosine 0.999 of the fp32 PyTorch model, not bit-equal to it."""
    import onnx

    from pipelines.cli import main

    model = tiny_htsat_roberta()
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "onnx", "--audio-input", "waveform",
                 "--quantize", "int8", "--output", str(tmp_path / "q")]) == 0
    meta = json.loads((tmp_path / "q" / META_FILE).read_text())
    linears = {"audio": sum(isinstance(m, torch.nn.Linear) for m in model.audio_encoder.modules()),
               "text": sum(isinstance(m, torch.nn.Linear) for m in model.text_encoder.modules()) - 1}  # - pooler
    assert meta["quantize"] == "int8" and meta["quantized_linears"] == linears and linears["audio"] >= 10
    audio = onnx.load(str(tmp_path / "q" / AUDIO_FILE))
    ops = [n.op_type for n in audio.graph.node]
    assert ops.count("MatMulInteger") == linears["audio"] and not linear_matmuls(audio, model.audio_encoder)
    assert "Gelu" in ops and "Erf" not in ops  # opset 20, the default: GELU as one operator
    fbank = model.frontend.logmel.mel.mel_scale.fb.numpy()  # (n_fft/2+1, n_mels), consumed by a float MatMul
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in audio.graph.initializer}
    assert any(n.op_type == "MatMul" and np.array_equal(consts.get(n.input[1], np.zeros(0)), fbank)
               for n in audio.graph.node)
    assert [n.op_type for n in onnx.load(str(tmp_path / "q" / TEXT_FILE)).graph.node].count("MatMulInteger") \
        == linears["text"]

    towers = OnnxTowers(tmp_path / "q")
    paths = wav_files(tmp_path, decoded_clips([1.0, 0.6, 2.2, 1.0]))
    exact = model.embed_audio(paths, batch_size=4, long_audio="window_mean", precision="fp32")
    fast = towers.embed_audio(paths, batch_size=4)
    cosine = (exact * fast).sum(1)
    assert cosine.min() >= 0.999 and not np.allclose(fast, exact, atol=1e-6), cosine
    batch = model.tokenize(CAPTIONS)
    with torch.no_grad():
        text_exact = model.encode_text(**batch).numpy()
    text_cosine = (towers.encode_text(batch["input_ids"].numpy(), batch["attention_mask"].numpy()) * text_exact).sum(1)
    assert text_cosine.min() >= 0.999, text_cosine
    # --quantize belongs to the onnx format
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "transformers", "--quantize", "int8",
                 "--output", str(tmp_path / "hf")]) == 2
    assert "--quantize applies to --format onnx" in capsys.readouterr().err and not (tmp_path / "hf").exists()
