"""Contrastive losses for CLAP: symmetric InfoNCE (CLIP) and pairwise sigmoid (SigLIP).

Temperatures live in the model (`LogitScale`, `SigmoidLogitScale`), not in the losses: the
losses receive the already exponentiated and clamped scales as tensors, so the optimizer,
the clamping and the checkpoint of the temperature stay with the other parameters.

Distributed training: each rank holds B local (audio, text) pairs; the losses gather the
features of all W ranks (rank-major, so rank r's rows are [r*B, (r+1)*B)) to use the global
batch as negatives. All ranks must use the same local batch size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F


class LogitScale(nn.Module):
    """Learnable CLIP temperature, stored as log(1/T) so the scale stays positive.

    forward() returns (scale_audio, scale_text): the scales for the audio->text and
    text->audio logits. With per_modality=True (CLARA) each direction learns its own
    temperature; otherwise both are the same tensor.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, per_modality: bool = False):
        super().__init__()
        if init_temperature <= 0 or max_scale <= 0:
            raise ValueError("init_temperature and max_scale must be positive")
        self.max_log_scale = math.log(max_scale)
        num_scales = 2 if per_modality else 1
        self.log_scale = nn.Parameter(torch.full((num_scales,), math.log(1.0 / init_temperature)))  # (1,) or (2,)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Out-of-place clamp: autograd sees it, and the zero gradient past the bound stops
        # the optimizer from pushing the scale further up.
        scale = torch.clamp(self.log_scale, max=self.max_log_scale).exp()  # (1,) or (2,)
        return scale[0], scale[-1]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored parameter in place (call after optimizer.step(), as CLIP does)."""
        self.log_scale.clamp_(max=self.max_log_scale)


class SigmoidLogitScale(nn.Module):
    """Learnable SigLIP scale and bias; the paper initialises them to 10 and -10.

    The negative bias starts the model near the prior that almost every pair is a negative.
    Both parameters have shape (1,), not (): ZeRO 2/3 flatten and partition every parameter and
    crash on 0-dim ones ("self.dim() cannot be 0 to view Float as Byte"). forward() returns 0-d
    tensors, and checkpoints written with the old 0-dim parameters still load.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, max_scale: float = 100.0):
        super().__init__()
        if init_scale <= 0 or max_scale <= 0:
            raise ValueError("init_scale and max_scale must be positive")
        self.max_log_scale = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.full((1,), math.log(init_scale)))  # (1,)
        self.bias = nn.Parameter(torch.full((1,), float(init_bias)))  # (1,)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.clamp(self.log_scale, max=self.max_log_scale).exp()[0], self.bias[0]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(max=self.max_log_scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("log_scale", "bias"):  # 0-dim tensors of checkpoints saved before the (1,) shape
            key = prefix + name
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _all_gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    # The backward of torch.distributed.nn.functional.all_gather sums the incoming gradients
    # of every rank into this rank's slice. On gloo (no reduce_scatter) torch emulates that
    # with scatters; tests/unit/train/test_distributed_loss.py checks it on a real gloo group.
    return torch.cat(dist_nn.all_gather(features), dim=0)  # (W*B, D)


def _all_gather_no_grad(features: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    gathered = [torch.zeros_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.contiguous())
    # The gathered copies are constants; putting the local tensor back in its slot lets this
    # rank's features get the gradient of every term of its own loss that involves them.
    gathered[rank] = features
    return torch.cat(gathered, dim=0)  # (W*B, D)


def gather_features(
    audio_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (B, D) features of all ranks into (W*B, D) tensors, rank-major.

    gather_with_grad=True back-propagates into the features of every rank (exact global
    gradient after DDP's averaging); False gives gradients only through the local slot.
    With world_size 1 the inputs are returned unchanged.
    """
    if world_size == 1:
        return audio_features, text_features
    if gather_with_grad:
        return _all_gather_with_grad(audio_features), _all_gather_with_grad(text_features)
    return (
        _all_gather_no_grad(audio_features, rank, world_size),
        _all_gather_no_grad(text_features, rank, world_size),
    )


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of the audio->text and text->audio cross-entropies.

    local_loss=True: each rank scores only its B local rows against all W*B columns, so the
    logits are (B, W*B) instead of (W*B, W*B); with gather_with_grad=True the average of the
    per-rank losses and gradients equals the full-batch loss and gradient.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self._labels: dict[torch.device, torch.Tensor] = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        labels = self._labels.get(device)
        if labels is None or labels.numel() != num_logits:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)  # (N,)
            if self.local_loss:
                # local row i is global row rank*B + i of the gathered columns
                labels = labels + self.rank * num_logits
            self._labels[device] = labels
        return labels

    def get_logits(
        self,
        audio_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale_audio: torch.Tensor,
        logit_scale_text: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        all_audio, all_text = gather_features(
            audio_features,
            text_features,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        if self.local_loss:
            logits_per_audio = logit_scale_audio * audio_features @ all_text.T  # (B, W*B)
            logits_per_text = logit_scale_text * text_features @ all_audio.T  # (B, W*B)
        else:
            similarity = all_audio @ all_text.T  # (W*B, W*B)
            logits_per_audio = logit_scale_audio * similarity
            logits_per_text = logit_scale_text * similarity.T
        return logits_per_audio, logits_per_text

    def forward(
        self,
        audio_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale_audio: torch.Tensor,
        logit_scale_text: torch.Tensor | None = None,
        output_dict: bool = True,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """audio_features, text_features: (B, D), L2-normalised; scales: 0-d tensors."""
        if logit_scale_text is None:
            logit_scale_text = logit_scale_audio
        logits_per_audio, logits_per_text = self.get_logits(
            audio_features, text_features, logit_scale_audio, logit_scale_text
        )
        labels = self.get_ground_truth(logits_per_audio.device, logits_per_audio.shape[0])
        loss = (F.cross_entropy(logits_per_audio, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023).

    Full batch of N pairs: L = -1/N * sum_{i,j} log sigmoid(z_ij * (scale * a_i.t_j + bias)),
    z_ij = +1 if i == j else -1 (normalised by the batch size, not by the N^2 pairs).

    Distributed: rank r scores its B local audio rows against the W*B texts of all ranks,
    gathered with gradient, and divides by B. The row blocks of the ranks partition the N^2
    pairs, so L = mean over ranks of the local losses, and since the gather's backward sums
    every rank's gradient into the text owner, DDP's gradient averaging yields exactly the
    full-batch gradient. (The paper passes text blocks around a ring instead of gathering
    them: the same sum with a smaller peak memory.)
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def get_ground_truth(self, device: torch.device, dtype: torch.dtype, num_audio: int, num_text: int) -> torch.Tensor:
        labels = -torch.ones(num_audio, num_text, device=device, dtype=dtype)  # (B, W*B)
        rows = torch.arange(num_audio, device=device)
        labels[rows, rows + self.rank * num_audio] = 1.0
        return labels

    def get_logits(
        self,
        audio_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        all_text = text_features if self.world_size == 1 else _all_gather_with_grad(text_features)  # (W*B, D)
        return logit_scale * audio_features @ all_text.T + logit_bias  # (B, W*B)

    def forward(
        self,
        audio_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        output_dict: bool = True,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """audio_features, text_features: (B, D), L2-normalised; scale, bias: 0-d tensors."""
        logits = self.get_logits(audio_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(logits.device, logits.dtype, *logits.shape)
        loss = -F.logsigmoid(labels * logits).sum() / audio_features.shape[0]
        return {"sigmoid_loss": loss} if output_dict else loss


LOSS_KINDS = ("infonce", "siglip")  # the model config's `loss` key


def build_loss(kind: str, local_loss: bool = True, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The training loss of a model whose config says `loss: kind`, on rank `rank` of `world_size`.

    infonce: ClipLoss gathering features with gradient, so the per-rank losses average to the full-batch
    loss and gradient; local_loss scores the B local rows against the W*B gathered columns ((B, W*B) logits
    instead of (W*B, W*B)). It takes both temperatures of the model (per_modality: a2t and t2a apart).
    siglip: SigLipLoss (always local rows against gathered texts, with gradient; local_loss is moot).
    """
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    if kind == "infonce":
        return ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size)
    raise ValueError(f"unknown loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
