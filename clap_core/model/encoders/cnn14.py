"""PANNs CNN14 (Kong et al. 2020) as the audio tower of Microsoft CLAP (2022).

Input is a log-mel batch (B, 1, T, F); output is the 2048-d clip embedding that
CNN14 computes before its AudioSet classifier (fc_audioset is not included).

Every block but the last halves time and frequency, so with the default six
blocks the input needs T >= 32 frames and n_mels >= 32 bins
(in general 2 ** (len(channels) - 1) for both).
"""

import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU, then average pooling."""

    def __init__(self, in_channels, out_channels, pool):
        super().__init__()
        # no conv bias: the BatchNorm that follows has its own shift
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool = pool

    def forward(self, x):  # (B, C_in, T, F)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))  # (B, C_out, T, F)
        return F.avg_pool2d(x, self.pool)  # (B, C_out, T / p, F / p)


class Cnn14(nn.Module):
    def __init__(self, n_mels=64, channels=(64, 128, 256, 512, 1024, 2048), embed_dim=2048, dropout=0.2):
        super().__init__()
        self.out_dim = embed_dim
        self.min_frames = 2 ** (len(channels) - 1)
        self.dropout = dropout
        # normalises each mel bin with its own statistics, as PANNs does
        self.bn0 = nn.BatchNorm2d(n_mels)
        pools = [(2, 2)] * (len(channels) - 1) + [(1, 1)]
        in_channels = (1,) + tuple(channels[:-1])
        self.blocks = nn.ModuleList(ConvBlock(i, o, p) for i, o, p in zip(in_channels, channels, pools))
        self.fc1 = nn.Linear(channels[-1], embed_dim)
        self._init_weights()

    def _init_weights(self):
        # PANNs initialisation: Xavier-uniform weights, zero biases, identity BN
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, mel):  # (B, 1, T, F)
        if mel.shape[2] < self.min_frames:
            raise ValueError(f"Cnn14 needs at least {self.min_frames} frames, got {mel.shape[2]}")
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)  # BN over the F axis, (B, 1, T, F)
        for block in self.blocks:
            x = block(x)
            x = F.dropout(x, self.dropout, self.training)
        x = x.mean(dim=3)  # (B, C, T')
        # max picks the most salient moment, mean summarises the whole clip
        x = x.amax(dim=2) + x.mean(dim=2)  # (B, C)
        x = F.dropout(x, self.dropout, self.training)
        return F.relu(self.fc1(x))  # (B, embed_dim)
