"""CLARA's audio encoder (Noriy et al. 2023): a conv head on the log-mel, then a Perceiver.

    log-mel (B, 1, T, F)
    -> Conv1d stack over time, mel bins as channels, GELU   (B, L, C), L = ceil(T / stride ** conv_layers)
    -> + sinusoidal positions
    -> cross-attention from num_latents learned latents      (B, N, D)
    -> self_layers pre-norm transformer layers on latents     (B, N, D)
    -> concat(mean, max) over latents                          (B, 2 * D)

Only the cross-attention sees the clip, so cost grows linearly with T; the latent
self-attention costs the same for any T. Any T >= 1 works up to max_frames.

Positions are a fixed sinusoidal table (no parameters to learn, and it extrapolates
smoothly), precomputed for max_frames input frames; raise max_frames for longer clips.
It is a non-persistent buffer, so changing max_frames does not change checkpoints.

frame_mask (B, T), True for real frames, lets a batch mix clip lengths. It must mark a
prefix (real frames first, then padding). Padded frames are zeroed before each conv, so
a real frame next to the padding sees exactly the zeros the unpadded clip would see at
its edge, and the cross-attention ignores the conv outputs centred on padding: a padded
clip embeds like the unpadded one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoids(length, dim):
    """Transformer sinusoidal positions, (length, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim / 2,)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class Attention(nn.Module):
    """Multi-head attention from queries x to a context (x itself for self-attention)."""

    def __init__(self, dim, context_dim, heads, dropout):
        super().__init__()
        assert dim % heads == 0, "latent_dim must be divisible by the number of heads"
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, key_mask=None):  # x (B, N, D), context (B, L, C), key_mask (B, L)
        B, N, D = x.shape
        L = context.shape[1]
        q = self.q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, D/H)
        k, v = self.kv(context).view(B, L, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, D/H)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L), True = attend
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, N, D/H)
        y = y.transpose(1, 2).reshape(B, N, D)
        return F.dropout(self.proj(y), self.dropout, self.training)  # (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim, mlp_ratio, dropout):
        super().__init__()
        self.fc = nn.Linear(dim, mlp_ratio * dim)
        self.proj = nn.Linear(mlp_ratio * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, N, D)
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class CrossAttentionBlock(nn.Module):
    """Latents read the clip: pre-norm cross-attention then MLP, both residual."""

    def __init__(self, dim, context_dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.ln_x = nn.LayerNorm(dim)
        self.ln_context = nn.LayerNorm(context_dim)
        self.attn = Attention(dim, context_dim, heads, dropout)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x, context, key_mask=None):  # x (B, N, D), context (B, L, C)
        x = x + self.attn(self.ln_x(x), self.ln_context(context), key_mask)
        return x + self.mlp(self.ln_mlp(x))  # (B, N, D)


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer layer over the latents."""

    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, heads, dropout)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x):  # (B, N, D)
        h = self.ln_attn(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.ln_mlp(x))  # (B, N, D)


class PerceiverAudioEncoder(nn.Module):
    def __init__(self, n_mels=64, conv_channels=256, conv_layers=2, conv_stride=2, num_latents=64,
                 latent_dim=256, cross_heads=1, self_heads=8, self_layers=4, mlp_ratio=4, dropout=0.1,
                 max_frames=4096):
        super().__init__()
        assert conv_layers >= 1, "the conv head needs at least one layer"
        self.out_dim = 2 * latent_dim
        self.min_frames = 1
        self.max_frames = max_frames
        self.conv_stride = conv_stride
        in_channels = [n_mels] + [conv_channels] * (conv_layers - 1)
        # kernel 3, padding 1: output j is centred on input frame j * stride, L_out = ceil(L_in / stride)
        self.convs = nn.ModuleList(nn.Conv1d(c, conv_channels, 3, stride=conv_stride, padding=1) for c in in_channels)
        max_positions = math.ceil(max_frames / conv_stride ** conv_layers)
        self.register_buffer("positions", sinusoids(max_positions, conv_channels), persistent=False)  # (P, C)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim) * 0.02)  # (N, D)
        self.cross = CrossAttentionBlock(latent_dim, conv_channels, cross_heads, mlp_ratio, dropout)
        self.layers = nn.ModuleList(SelfAttentionBlock(latent_dim, self_heads, mlp_ratio, dropout) for _ in range(self_layers))
        self.ln_f = nn.LayerNorm(latent_dim)

    def conv_head(self, mel, frame_mask=None):
        """(B, 1, T, F) -> features (B, L, C) and their mask (B, L) (None without frame_mask)."""
        x = mel[:, 0].transpose(1, 2)  # mel bins as channels, (B, F, T)
        mask = frame_mask
        for conv in self.convs:
            if mask is not None:
                x = x * mask[:, None, :]  # padding reads as the conv's own zero padding
            x = F.gelu(conv(x))  # (B, C, L)
            if mask is not None:
                mask = mask[:, :: self.conv_stride]  # an output is real iff its centre frame is
        x = x.transpose(1, 2)  # (B, L, C)
        return x + self.positions[: x.shape[1]], mask

    def cross_attend(self, mel, frame_mask=None):
        """Latents after reading the clip, (B, num_latents, latent_dim) whatever T is."""
        T = mel.shape[2]
        if T > self.max_frames:
            raise ValueError(f"clip has {T} frames, more than max_frames={self.max_frames}")
        context, key_mask = self.conv_head(mel, frame_mask)  # (B, L, C), (B, L)
        latents = self.latents.expand(mel.shape[0], -1, -1)  # (B, N, D)
        return self.cross(latents, context, key_mask)

    def forward(self, mel, frame_mask=None):  # (B, 1, T, F), (B, T) bool
        x = self.cross_attend(mel, frame_mask)  # (B, N, D)
        for layer in self.layers:
            x = layer(x)
        x = self.ln_f(x)
        return torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1)  # (B, 2 * D)
