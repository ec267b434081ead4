"""`clap export --format onnx`: ONNX Runtime equals PyTorch within 1e-4, at batch sizes and caption lengths
other than the ones the graphs were exported with."""
import numpy as np
import pytest
import torch

from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.frontend import crop_or_pad_tensor
from clap_core.model.onnx_export import OnnxTowers, export_onnx
from tests.fixtures.audio import decoded_clips
from tests.fixtures.models import tiny_htsat_roberta

pytest.importorskip("onnxruntime")
CAPTIONS = ["a dog", "glass breaking on a stone floor", "a low voice speaking slowly in a large hall"]


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


def test_onnx_export_refuses_fused_models_and_wrong_inputs(tmp_path):
    with pytest.raises(ValueError, match="fused HTS-AT.*data-dependent"):
        export_onnx(tiny_htsat_roberta(fusion=True), tmp_path / "fused")
    with pytest.raises(ValueError, match="audio_input"):
        export_onnx(tiny_htsat_roberta(), tmp_path / "x", audio_input="spectrogram")
    assert not (tmp_path / "fused").exists()
