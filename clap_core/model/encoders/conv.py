"""A tiny 2D-conv log-mel encoder for the `tiny` model: trains on CPU in seconds.

Input is a log-mel batch (B, 1, T, F); output is (B, embed_dim). Each block halves
time and frequency, so T and n_mels must be >= 2 ** len(channels) (8 by default).
"""

import torch.nn as nn


class TinyConvEncoder(nn.Module):
    def __init__(self, n_mels=64, channels=(16, 32, 64), embed_dim=64):
        super().__init__()
        self.out_dim = embed_dim
        self.min_frames = 2 ** len(channels)
        self.bn0 = nn.BatchNorm2d(n_mels)  # per-mel-bin normalisation, as in CNN14
        in_channels = (1,) + tuple(channels[:-1])
        self.blocks = nn.Sequential(*(
            nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1, bias=False),  # BN supplies the shift
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.AvgPool2d(2),
            )
            for i, o in zip(in_channels, channels)
        ))
        self.fc = nn.Linear(channels[-1], embed_dim)

    def forward(self, mel):  # (B, 1, T, F)
        if mel.shape[2] < self.min_frames:
            raise ValueError(f"TinyConvEncoder needs at least {self.min_frames} frames, got {mel.shape[2]}")
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)  # BN over the F axis, (B, 1, T, F)
        x = self.blocks(x)  # (B, C, T', F')
        x = x.mean(dim=3)  # (B, C, T')
        x = x.amax(dim=2) + x.mean(dim=2)  # (B, C)
        return self.fc(x)  # (B, embed_dim)
