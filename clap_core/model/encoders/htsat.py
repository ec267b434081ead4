"""HTS-AT (Chen et al. 2022), the LAION-CLAP audio encoder, through transformers' `ClapAudioModel`.

We reuse transformers' implementation rather than re-writing the Swin-based HTS-AT, so LAION-CLAP
weights converted to the transformers format load without renaming the encoder's parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import ClapAudioConfig, ClapAudioModel


class HTSATEncoder(nn.Module):
    """Log-mel (B, C, T, F) + is_longer (B, 1) -> pooled features (B, out_dim).

    C is 1, or 4 with fusion (global view + 3 chunks). T may be at most spec_size * (spec_size // F)
    frames (1024 for the defaults: a 10 s window at 100 frames/s); shorter inputs are interpolated.
    """

    takes_is_longer = True  # ClapModel passes the fusion flag to this encoder

    def __init__(self, n_mels: int = 64, spec_size: int = 256, patch_size: int = 4,
                 patch_stride: tuple[int, int] = (4, 4), patch_embeds_hidden_size: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_attention_heads: tuple[int, ...] = (4, 8, 16, 32),
                 window_size: int = 8, mlp_ratio: float = 4.0, hidden_dropout_prob: float = 0.0,
                 drop_path_rate: float = 0.1, enable_fusion: bool = False, fusion_type: str | None = None):
        super().__init__()
        self.out_dim = patch_embeds_hidden_size * 2 ** (len(depths) - 1)
        config = ClapAudioConfig(
            num_mel_bins=n_mels, spec_size=spec_size, patch_size=patch_size, patch_stride=list(patch_stride),
            patch_embeds_hidden_size=patch_embeds_hidden_size, depths=list(depths),
            num_attention_heads=list(num_attention_heads), window_size=window_size, mlp_ratio=mlp_ratio,
            hidden_dropout_prob=hidden_dropout_prob, drop_path_rate=drop_path_rate, hidden_size=self.out_dim,
            enable_fusion=enable_fusion, fusion_type=fusion_type,
        )
        self.model = ClapAudioModel(config)

    def forward(self, mel: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        if is_longer is None:
            is_longer = torch.zeros(mel.shape[0], 1, dtype=torch.bool, device=mel.device)
        return self.model(input_features=mel, is_longer=is_longer).pooler_output  # (B, out_dim)
