"""Import released LAION-CLAP weights (transformers `ClapModel` folder format) into `htsat-tiny-roberta`.

    model = import_laion_clap("path/to/clap-htsat-unfused")   # or ClapModel.from_pretrained(same path)

The folder holds transformers' `config.json` (model_type "clap"), its weights and a RoBERTa tokenizer.
The architecture is read from that config, so fused, unfused and smaller variants all import; the
audio tower is transformers' own `ClapAudioModel` inside our HTS-AT wrapper, and the text tower is a
RoBERTa with the same weights (transformers' ClapTextModel is RoBERTa with a pooler).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers import ClapModel as HFClapModel

from clap_core.config import from_dict, to_dict
from clap_core.model import ClapModel
from clap_core.model_config import ClapModelConfig, get_model_config

_AUDIO_FIELDS = ("spec_size", "patch_size", "patch_embeds_hidden_size", "window_size", "mlp_ratio",
                 "hidden_dropout_prob", "drop_path_rate", "enable_fusion", "fusion_type")
_TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")


def laion_model_config(hf_config, max_length: int = 77) -> ClapModelConfig:
    """Our `htsat-tiny-roberta` config with every size taken from a transformers ClapConfig."""
    audio, text = hf_config.audio_config, hf_config.text_config
    cfg = to_dict(get_model_config("htsat-tiny-roberta"))
    cfg["embed_dim"] = hf_config.projection_dim
    # HTS-AT takes at most spec_size * (spec_size // n_mels) frames: 10 s for LAION's 256 x 64 setup.
    max_frames = audio.spec_size * (audio.spec_size // audio.num_mel_bins)
    hop, sr = cfg["audio"]["hop_length"], cfg["audio"]["sample_rate"]
    clip_seconds = min(10.0, (max_frames - 1) * hop / sr)
    cfg["audio"].update(n_mels=audio.num_mel_bins, fusion=bool(audio.enable_fusion), clip_seconds=clip_seconds)
    cfg["audio_encoder"].update({k: getattr(audio, k) for k in _AUDIO_FIELDS})
    cfg["audio_encoder"].update(patch_stride=list(_pair(audio.patch_stride)), depths=list(audio.depths),
                                num_attention_heads=list(audio.num_attention_heads))
    hf_text = {k: getattr(text, k) for k in _TEXT_FIELDS if getattr(text, k, None) is not None}
    cfg["text_encoder"].update(pretrained=None, hf_config={"model_type": "roberta", **hf_text},
                               pooling="pooler", max_length=max_length)
    cfg["audio_projection"] = {"layers": 2, "activation": audio.projection_hidden_act}
    cfg["text_projection"] = {"layers": 2, "activation": text.projection_hidden_act}
    return from_dict(ClapModelConfig, cfg)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def laion_state_dict(hf_model: HFClapModel) -> dict[str, torch.Tensor]:
    """transformers ClapModel parameter names -> ours."""
    renames = {"audio_model.": "audio_encoder.model.", "text_model.": "text_encoder.backbone.",
               "audio_projection.": "audio_projection.", "text_projection.": "text_projection."}
    state = {}
    for name, tensor in hf_model.state_dict().items():
        for old, new in renames.items():
            if name.startswith(old):
                state[new + name[len(old):]] = tensor
    # LAION scores both directions with logit_scale_a (logit_scale_t belongs to its unused MLP branch).
    state["logit_scale.log_scale"] = hf_model.logit_scale_a.detach().reshape(1)
    return state


def import_laion_clap(path: str | Path, max_length: int = 77) -> ClapModel:
    """Build `htsat-tiny-roberta` from a transformers LAION-CLAP folder; returns the model in eval mode."""
    hf_model = HFClapModel.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = ClapModel(laion_model_config(hf_model.config, max_length), tokenizer=tokenizer)
    state = laion_state_dict(hf_model)
    # Only learnable tensors must match: RoBERTa's position/token-type id buffers may differ in persistence.
    buffers = {name for name, _ in model.named_buffers()} | {n for n in state if n.endswith(("_ids",))}
    missing = [n for n, _ in model.named_parameters() if n not in state]
    unexpected = [n for n in state if n not in model.state_dict() and n not in buffers]
    if missing or unexpected:
        raise ValueError(f"LAION-CLAP import mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({n: t for n, t in state.items() if n in model.state_dict()}, strict=False)
    return model.eval()
