"""Small models built offline for export and fast-path tests."""
from __future__ import annotations

import torch

from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config

TINY_TEXT = ["text_encoder.pretrained=null", "text_encoder.tokenizer=bytes",
             "text_encoder.hf_config.hidden_size=32", "text_encoder.hf_config.num_hidden_layers=2",
             "text_encoder.hf_config.num_attention_heads=2", "text_encoder.hf_config.intermediate_size=48",
             "text_encoder.hf_config.max_position_embeddings=80", "text_encoder.hf_config.vocab_size=262"]


def tiny_htsat_roberta(fusion: bool = False, mel_scale: str | None = None, seed: int = 0) -> ClapModel:
    """HTS-AT + RoBERTa (the LAION-CLAP family) at toy size: 1 s window, 2 Swin stages, 2 text layers.

    Unfused: 32 Slaney mels (as transformers' extractor computes for it); fused: 64 HTK mels.
    """
    mel_scale = mel_scale or ("htk" if fusion else "slaney")
    overrides = ["embed_dim=24", "audio.clip_seconds=1", f"audio.n_mels={64 if fusion else 32}",
                 f"audio.mel_scale={mel_scale}", f"audio.fusion={str(fusion).lower()}",
                 f"audio_encoder.enable_fusion={str(fusion).lower()}",
                 f"audio_encoder.fusion_type={'aff_2d' if fusion else 'null'}",
                 f"audio_encoder.spec_size={128 if fusion else 64}", "audio_encoder.patch_embeds_hidden_size=16",
                 "audio_encoder.depths=[1,1]", "audio_encoder.num_attention_heads=[2,2]",
                 "audio_encoder.window_size=4", *TINY_TEXT]
    torch.manual_seed(seed)
    model = ClapModel(get_model_config("htsat-tiny-roberta", overrides))
    with torch.no_grad():  # non-trivial temperature and BN statistics, so a wrong mapping shows
        model.logit_scale.log_scale.fill_(2.5)
        bn = model.audio_encoder.model.audio_encoder.batch_norm
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()
