"""The transformers `ClapModel` folder format, both ways: import LAION-CLAP releases, export ours.

    model = ClapModel.from_laion("path/to/clap-htsat-unfused")   # or ClapModel.from_pretrained(same path)
    export_transformers(model, "out/")   # transformers.ClapModel / ClapProcessor / pipeline load "out/"

`read_laion_folder` reads a folder into our config, state dict and tokenizer; ClapModel.from_laion builds
the model from them (`clap_core.import_laion_clap` is the same call), so this module never imports clap.py.
The folder holds transformers' `config.json` (model_type "clap"), its weights and a RoBERTa tokenizer.
The architecture is read from that config, so fused, unfused and smaller variants all import; the
audio tower is transformers' own `ClapAudioModel` inside our HTS-AT wrapper, and the text tower is a
RoBERTa with the same weights (transformers' ClapTextModel is RoBERTa with a pooler).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import AutoTokenizer, ClapConfig, ClapFeatureExtractor, ClapProcessor, PreTrainedTokenizerBase
from transformers import ClapModel as HFClapModel

from clap_core.config import from_dict, load_config, to_dict
from clap_core.model.config import MODEL_CONFIG_DIR, ClapModelConfig

if TYPE_CHECKING:  # type hints only: clap.py imports this module (ClapModel.from_laion), never the reverse
    from clap_core.model.clap import ClapModel

_AUDIO_FIELDS = ("spec_size", "patch_size", "patch_embeds_hidden_size", "window_size", "mlp_ratio",
                 "hidden_dropout_prob", "drop_path_rate", "enable_fusion", "fusion_type")
# transformers ClapModel parameter prefixes -> ours; the one name mapping, used in both directions.
RENAMES = {"audio_model.": "audio_encoder.model.", "text_model.": "text_encoder.backbone.",
           "audio_projection.": "audio_projection.", "text_projection.": "text_projection."}
FEATURE_EXTRACTOR_FILE, PROCESSOR_FILE = "preprocessor_config.json", "processor_config.json"
_TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")


def laion_model_config(hf_config, max_length: int = 77, feature_extractor: dict | None = None) -> ClapModelConfig:
    """Our `htsat-tiny-roberta` config with every size taken from a transformers ClapConfig.

    `feature_extractor` (the folder's preprocessor_config.json) sets the front end when given.
    """
    audio, text = hf_config.audio_config, hf_config.text_config
    cfg = to_dict(load_config(ClapModelConfig, MODEL_CONFIG_DIR / "htsat-tiny-roberta.yaml"))  # never offline_variant
    cfg["embed_dim"] = hf_config.projection_dim
    # HTS-AT takes at most spec_size * (spec_size // n_mels) frames: 10 s for LAION's 256 x 64 setup.
    max_frames = audio.spec_size * (audio.spec_size // audio.num_mel_bins)
    hop, sr = cfg["audio"]["hop_length"], cfg["audio"]["sample_rate"]
    clip_seconds = min(10.0, (max_frames - 1) * hop / sr)
    cfg["audio"].update(n_mels=audio.num_mel_bins, fusion=bool(audio.enable_fusion), clip_seconds=clip_seconds)
    if feature_extractor is not None:
        cfg["audio"].update(frontend_from_feature_extractor(feature_extractor))
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


def frontend_from_feature_extractor(fe: dict) -> dict:
    """ClapFeatureExtractor settings -> our AudioFrontendConfig fields.

    transformers picks the filterbank from the truncation mode: HTK for "fusion", Slaney for "rand_trunc".
    """
    if fe.get("padding", "repeatpad") not in ("repeatpad", "pad"):
        raise ValueError(f"feature extractor padding '{fe['padding']}' has no equivalent here (repeatpad, pad)")
    return {"sample_rate": fe["sampling_rate"], "n_fft": fe["fft_window_size"], "hop_length": fe["hop_length"],
            "n_mels": fe["feature_size"], "f_min": float(fe["frequency_min"]), "f_max": float(fe["frequency_max"]),
            "clip_seconds": float(fe["max_length_s"]),
            "pad_mode": "repeatpad" if fe.get("padding", "repeatpad") == "repeatpad" else "zero",
            "mel_scale": "htk" if fe.get("truncation", "fusion") == "fusion" else "slaney"}


def read_feature_extractor_settings(path: str | Path) -> dict | None:
    """The folder's ClapFeatureExtractor settings: preprocessor_config.json or processor_config.json (v5)."""
    path = Path(path)
    if (path / FEATURE_EXTRACTOR_FILE).is_file():
        return json.loads((path / FEATURE_EXTRACTOR_FILE).read_text())
    if (path / PROCESSOR_FILE).is_file():
        return json.loads((path / PROCESSOR_FILE).read_text()).get("feature_extractor")
    return None


def laion_state_dict(hf_model: HFClapModel) -> dict[str, torch.Tensor]:
    """transformers ClapModel parameter names -> ours."""
    state = {}
    for name, tensor in hf_model.state_dict().items():
        for old, new in RENAMES.items():
            if name.startswith(old):
                state[new + name[len(old):]] = tensor
    # LAION scores both directions with logit_scale_a (logit_scale_t belongs to its unused MLP branch).
    state["logit_scale.log_scale"] = hf_model.logit_scale_a.detach().reshape(1)
    return state


class LaionFolder(NamedTuple):
    """What a transformers LAION-CLAP folder holds, in our terms: ClapModel.from_laion builds the model from it."""
    config: ClapModelConfig  # htsat-tiny-roberta with the folder's sizes and front end
    state: dict[str, torch.Tensor]  # weights under our parameter names (RENAMES)
    tokenizer: PreTrainedTokenizerBase  # the folder's RoBERTa tokenizer


def read_laion_folder(path: str | Path, max_length: int = 77) -> LaionFolder:
    """Read a transformers LAION-CLAP folder (config.json, weights, tokenizer, feature extractor settings)."""
    hf_model = HFClapModel.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = laion_model_config(hf_model.config, max_length, read_feature_extractor_settings(path))
    return LaionFolder(config, laion_state_dict(hf_model), tokenizer)


# --- export: our model -> a transformers ClapModel folder (the inverse of the import above) ---


def transformers_export_problems(model: "ClapModel") -> list[str]:
    """Why transformers' ClapModel + ClapFeatureExtractor cannot represent this model (empty: it can)."""
    problems, config = [], model.config
    enc, text, audio = config.audio_encoder, config.text_encoder, config.audio
    if enc.type != "htsat":
        problems.append(f"audio encoder '{enc.type}': transformers' ClapModel has only HTS-AT")
    model_type = model.text_encoder.backbone.config.model_type
    if model_type != "roberta":
        problems.append(f"text backbone '{model_type}': transformers' ClapTextModel is RoBERTa only")
    if text.pooling != "pooler":
        problems.append(f"text pooling '{text.pooling}': ClapTextModel pools with RoBERTa's pooler")
    for side, proj in (("audio", config.audio_projection), ("text", config.text_projection)):
        if proj.layers != 2:
            problems.append(f"{side} projection with {proj.layers} layer(s): ClapProjectionLayer has 2")
    if config.loss != "infonce":
        problems.append(f"loss '{config.loss}': ClapModel has no SigLIP bias")
    if config.temperature.per_modality:
        problems.append("per-modality temperatures: LAION's folders keep one (logit_scale_t is unused)")
    # ClapFeatureExtractor uses the HTK filterbank exactly when it fuses, Slaney otherwise.
    wanted = "htk" if audio.fusion else "slaney"
    if audio.mel_scale != wanted:
        problems.append(f"{'fused' if audio.fusion else 'unfused'} model with a {audio.mel_scale} mel front end: "
                        f"ClapFeatureExtractor computes {wanted} mels for it (train with audio.mel_scale={wanted})")
    if audio.fusion and audio.n_mels != 64:
        problems.append(f"fusion with {audio.n_mels} mels: ClapFeatureExtractor's fusion assumes 64")
    if audio.clip_seconds != int(audio.clip_seconds):
        # It pads to max_length_s * sampling_rate samples, which numpy needs as an integer.
        problems.append(f"clip_seconds={audio.clip_seconds}: ClapFeatureExtractor takes whole seconds only")
    return problems


def feature_extractor_settings(config: ClapModelConfig) -> dict:
    """Our front end as ClapFeatureExtractor kwargs (the inverse of frontend_from_feature_extractor)."""
    audio = config.audio
    return {"feature_size": audio.n_mels, "sampling_rate": audio.sample_rate, "hop_length": audio.hop_length,
            "max_length_s": int(audio.clip_seconds), "fft_window_size": audio.n_fft,
            "frequency_min": audio.f_min, "frequency_max": audio.f_max, "top_db": None,
            "truncation": "fusion" if audio.fusion else "rand_trunc",
            "padding": "repeatpad" if audio.pad_mode == "repeatpad" else "pad"}


def transformers_config(model: "ClapModel") -> ClapConfig:
    config = model.config
    audio = model.audio_encoder.model.config.to_dict()
    audio.update(projection_dim=config.embed_dim, projection_hidden_act=config.audio_projection.activation)
    backbone = model.text_encoder.backbone.config
    text = {k: getattr(backbone, k) for k in _TEXT_FIELDS if getattr(backbone, k, None) is not None}
    text.update(projection_dim=config.embed_dim, projection_hidden_act=config.text_projection.activation)
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=config.embed_dim,
                      logit_scale_init_value=float(model.logit_scales()[0].detach()))


def transformers_state_dict(model: "ClapModel") -> dict[str, torch.Tensor]:
    """Our parameter names -> transformers ClapModel's (RENAMES read backwards)."""
    state = {}
    for name, tensor in model.state_dict().items():
        for hf_prefix, ours in RENAMES.items():
            if name.startswith(ours):
                state[hf_prefix + name[len(ours):]] = tensor
    # Both directions score with our one temperature (clamped the way our forward clamps it).
    log_scale = torch.log(model.logit_scales()[0].detach()).reshape(())
    state["logit_scale_a"] = log_scale.clone()
    state["logit_scale_t"] = log_scale.clone()
    return state


def export_transformers(model: "ClapModel", output: str | Path) -> Path:
    """Write `model` as a transformers ClapModel folder: config.json, weights, tokenizer, preprocessor config."""
    model.require_text_tower("export_transformers")
    problems = transformers_export_problems(model)
    if problems:
        raise ValueError("cannot export this model to the transformers ClapModel format: " + "; ".join(problems))
    output = Path(output)
    hf_model = HFClapModel(transformers_config(model)).eval()
    state = transformers_state_dict(model)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not n.endswith("_ids")]  # position/token-type id buffers
    if missing or unexpected:
        raise ValueError(f"transformers export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf_model.save_pretrained(str(output))
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.model_max_length = model.config.text_encoder.max_length
    feature_extractor = ClapFeatureExtractor(**feature_extractor_settings(model.config))
    ClapProcessor(feature_extractor, tokenizer).save_pretrained(str(output))
    feature_extractor.save_pretrained(str(output))  # preprocessor_config.json, as LAION's own folders have it
    return output
