"""Audio front end: waveforms at 48 kHz -> fixed-length log-mel batches, on the model's device.

LAION-CLAP defaults: n_fft 1024, hop 480 (100 frames/s), 64 mel bins from 50 to 14000 Hz, power
spectrogram in dB. Clips are cropped or padded to `clip_seconds`: a random crop while training, the
centre crop in eval, so embeddings are deterministic. With fusion (HTS-AT), a clip longer than the
window becomes 4 views: the whole clip squeezed to the window length plus 3 local chunks (front,
middle, back), and `is_longer` tells the encoder which clips need its fusion branch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio


class LogMel(nn.Module):
    """(B, N) waveforms -> (B, T, F) log-mel in dB, T = N // hop + 1."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float, f_max: float,
                 mel_scale: str = "htk"):
        super().__init__()
        # "slaney" is librosa's default filterbank (Slaney scale, area-normalised), "htk" torchaudio's.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=n_fft, hop_length=hop_length,
            f_min=f_min, f_max=f_max, n_mels=n_mels, power=2.0, center=True, pad_mode="reflect",
            norm="slaney" if mel_scale == "slaney" else None, mel_scale=mel_scale,
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)
        for module in self.modules():  # window and filterbank follow from the config: keep them out of checkpoints
            module._non_persistent_buffers_set.update(module._buffers)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # STFT in float32 even under autocast: bf16 power spectra lose the quiet bins.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            mel = self.to_db(self.mel(wave.float()))  # (B, F, T)
        return mel.transpose(1, 2)  # (B, T, F)


def repeat_pad(wave: torch.Tensor, length: int) -> torch.Tensor:
    """(N,) -> (length,): repeat the clip as many whole times as fit, then zero-pad (LAION 'repeatpad')."""
    n = wave.shape[0]
    repeats = max(length // n, 1)
    return F.pad(wave.repeat(repeats), (0, length - n * repeats))


def crop_start(n: int, length: int, training: bool, generator: torch.Generator | None) -> int:
    """Start of the `length`-sample window in an `n`-sample clip: random in training, centred in eval."""
    if training:
        return int(torch.randint(0, n - length + 1, (1,), generator=generator))
    return (n - length) // 2


def crop_or_pad_tensor(wave: torch.Tensor, length: int, pad_mode: str, training: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) -> (length,) by cropping long clips or padding short ones (repeat or zeros), on the model's device.

    The tensor twin of clap_core.audio.clips.crop_or_pad: it runs inside forward, crops with a torch Generator
    and knows LAION's repeat-padding; the host-side numpy fitting lives in clips."""
    n = wave.shape[0]
    if n > length:
        start = crop_start(n, length, training, generator)
        return wave[start:start + length]
    if pad_mode == "repeatpad":
        return repeat_pad(wave, length)
    return F.pad(wave, (0, length - n))


def fusion_views(mel: torch.Tensor, chunk_frames: int, training: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(T, F) log-mel of a long clip -> (4, chunk_frames, F): global view + front/middle/back chunks."""
    total, n_mels = mel.shape
    last_start = total - chunk_frames
    # Candidate starts split in thirds; a clip barely over the window may leave a third empty.
    thirds = [r if len(r) else torch.tensor([last_start]) for r in torch.arange(last_start + 1).tensor_split(3)]
    starts = [_pick(r, training, generator) for r in thirds]
    chunks = [mel[s:s + chunk_frames] for s in starts]
    global_view = F.interpolate(mel[None, None], size=(chunk_frames, n_mels), mode="bilinear",
                                align_corners=False)[0, 0]
    return torch.stack([global_view, *chunks])  # (4, chunk_frames, F)


def _pick(candidates: torch.Tensor, training: bool, generator: torch.Generator | None) -> int:
    if training:
        return int(candidates[torch.randint(0, len(candidates), (1,), generator=generator)])
    return int(candidates[len(candidates) // 2])


class AudioFrontend(nn.Module):
    """Waveforms (B, N) at `sample_rate` with optional valid lengths (B,) -> (mel, is_longer).

    mel is (B, 1, T, F), or (B, 4, T, F) with fusion; is_longer is a (B, 1) bool tensor.
    """

    def __init__(self, sample_rate: int = 48_000, n_fft: int = 1024, hop_length: int = 480, n_mels: int = 64,
                 f_min: float = 50.0, f_max: float = 14_000.0, clip_seconds: float = 10.0,
                 pad_mode: str = "repeatpad", fusion: bool = False, mel_scale: str = "htk"):
        super().__init__()
        self.sample_rate = sample_rate
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.frames = self.clip_samples // hop_length + 1
        self.pad_mode = pad_mode
        self.fusion = fusion
        self.logmel = LogMel(sample_rate, n_fft, hop_length, n_mels, f_min, f_max, mel_scale)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self._lengths(waves, lengths)
        clips = [waves[i, :int(n)] for i, n in enumerate(lengths)]
        is_longer = torch.tensor([[int(n) > self.clip_samples] for n in lengths], device=waves.device)
        if not self.fusion:
            fixed = torch.stack([crop_or_pad_tensor(c, self.clip_samples, self.pad_mode, self.training, generator)
                                 for c in clips])  # (B, clip_samples)
            return self.logmel(fixed)[:, None], is_longer  # (B, 1, T, F)
        return torch.stack([self._fused(c, generator) for c in clips]), is_longer  # (B, 4, T, F)

    def fixed_waveforms(self, waves: torch.Tensor, lengths: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) + lengths -> the window waveforms (B, clip_samples) and their real samples (B,), for speech towers.

        Cropping is the log-mel path's (random in training, centre in eval). With pad_mode 'zero' the padding
        is reported so the tower can mask it; 'repeatpad' fills the window, so every sample counts as real.
        """
        lengths = self._lengths(waves, lengths)
        fixed = torch.stack([crop_or_pad_tensor(waves[i, :int(n)], self.clip_samples, self.pad_mode, self.training,
                                                generator) for i, n in enumerate(lengths)])  # (B, clip_samples)
        valid = lengths.clamp(max=self.clip_samples) if self.pad_mode == "zero" \
            else torch.full_like(lengths, self.clip_samples)
        return fixed, valid.to(waves.device)

    def _fused(self, clip: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if clip.shape[0] > self.clip_samples:
            return fusion_views(self.logmel(clip[None])[0], self.frames, self.training, generator)
        fixed = crop_or_pad_tensor(clip, self.clip_samples, self.pad_mode, self.training, generator)  # (clip_samples,)
        mel = self.logmel(fixed[None])[0]
        return mel.expand(4, -1, -1)  # short clip: the same view four times, as LAION does

    @staticmethod
    def _lengths(waves: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            return torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long)
        return lengths.detach().cpu().long()
