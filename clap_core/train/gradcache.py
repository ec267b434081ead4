"""One contrastive training step, plain or with a gradient cache (Gao et al. 2021, "GradCache").

    loss = plain_step(model, loss_fn, batch, backward)                  # whole batch with graph
    loss = grad_cache_step(model, loss_fn, batch, chunk=64, backward)    # batch far beyond memory

The contrastive loss needs every embedding of the batch at once, so a batch whose activations do
not fit cannot simply be split into micro-batches. The gradient cache makes activation memory
depend on the chunk size only:
  1. embed the whole batch chunk by chunk without a graph (remembering each chunk's RNG state),
  2. compute the loss on those embeddings and its gradient w.r.t. them (small: (B, D) each),
  3. re-run the encoders chunk by chunk with graph, replaying the RNG state so dropout and crops
     match step 1, and back-propagate the cached embedding gradients: sum(emb * grad) per chunk.
The parameter gradients are those of the full-batch step (tests/unit/train/test_gradcache.py: 1e-5).

`model` is a ClapModel or anything that calls it (a DeepSpeed engine): model(waves, input_ids,
attention_mask, lengths) -> dict with audio_embeds, text_embeds and the logit scale(s).
`backward(tensor)` runs the backward pass (tensor.backward, or engine.backward); it is called once
per chunk, and the caller steps the optimizer once afterwards.

BatchNorm mixes the samples of a batch, which the gradient cache cannot reproduce chunk by chunk;
during a cached step BatchNorm layers normalise with their running statistics, and the statistics
of the whole batch, observed in pass 1, update the running statistics after the step.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn

Batch = dict[str, torch.Tensor]
Backward = Callable[[torch.Tensor], object]


def contrastive_loss(loss_fn: nn.Module, audio: torch.Tensor, text: torch.Tensor,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
    """InfoNCE (two scales) or SigLIP (scale + bias) on (B, D) embeddings, with the scales of a forward output."""
    if "logit_bias" in out:
        return loss_fn(audio, text, out["logit_scale"], out["logit_bias"], output_dict=False)
    return loss_fn(audio, text, out["logit_scale"], out["logit_scale_text"], output_dict=False)


def forward(model: Callable, batch: Batch) -> dict[str, torch.Tensor]:
    return model(batch["waves"], batch["input_ids"], batch["attention_mask"], batch.get("lengths"))


def plain_step(model: Callable, loss_fn: nn.Module, batch: Batch, backward: Backward) -> torch.Tensor:
    """Forward the whole batch with graph, backward once. Returns the loss (detached)."""
    out = forward(model, batch)
    loss = contrastive_loss(loss_fn, out["audio_embeds"].float(), out["text_embeds"].float(), out)
    backward(loss)
    return loss.detach()


def split_batch(batch: Batch, chunk: int) -> list[Batch]:
    size = batch["waves"].shape[0]
    return [{k: v[i:i + chunk] for k, v in batch.items()} for i in range(0, size, chunk)]


class RngState:
    """The CPU (and current accelerator) generator state, to replay a chunk's random draws."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # the global RNG continues as if nothing was replayed
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class BatchNormRunningStats:
    """Inside `frozen()`: BatchNorm in eval mode; inside `observe()`: record the batch statistics of its inputs."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        self.sums: dict[nn.Module, list[torch.Tensor]] = {}

    @contextmanager
    def frozen(self) -> Iterator["BatchNormRunningStats"]:
        for layer in self.layers:
            layer.eval()
        try:
            yield self
        finally:
            for layer in self.layers:
                layer.train()
        self._update_running_stats()

    @contextmanager
    def observe(self) -> Iterator[None]:
        hooks = [layer.register_forward_pre_hook(self._record) for layer in self.layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _record(self, layer: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()  # (N, C, ...)
        dims = [0, *range(2, x.ndim)]
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        stats = [count, x.sum(dims), (x * x).sum(dims)]
        prev = self.sums.get(layer)
        self.sums[layer] = stats if prev is None else [a + b for a, b in zip(prev, stats)]

    @torch.no_grad()
    def _update_running_stats(self) -> None:
        """The update one train-mode forward of the whole batch would make."""
        for layer, (count, total, total_sq) in self.sums.items():
            if layer.running_mean is None:
                continue
            mean = total / count
            var = (total_sq / count - mean * mean).clamp(min=0) * count / (count - 1).clamp(min=1)  # unbiased
            layer.num_batches_tracked += 1
            momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
            layer.running_mean.lerp_(mean.to(layer.running_mean.dtype), momentum)
            layer.running_var.lerp_(var.to(layer.running_var.dtype), momentum)
        self.sums.clear()


def grad_cache_step(model: Callable, loss_fn: nn.Module, batch: Batch, chunk: int, backward: Backward,
                    module: nn.Module | None = None) -> torch.Tensor:
    """Full-batch contrastive gradients with activation memory of `chunk` pairs. Returns the loss (detached).

    `module` is the nn.Module behind `model` (the engine's .module), for its BatchNorm layers and device.
    """
    module = module if module is not None else model
    device = batch["waves"].device
    chunks = split_batch(batch, chunk)
    with BatchNormRunningStats(module).frozen() as batchnorm:
        # 1. embeddings of the whole batch, no graph
        states, audio, text = [], [], []
        with torch.no_grad(), batchnorm.observe():
            for part in chunks:
                states.append(RngState(device))
                out = forward(model, part)
                audio.append(out["audio_embeds"].float())
                text.append(out["text_embeds"].float())
        all_audio = torch.cat(audio).requires_grad_()  # (B, D)
        all_text = torch.cat(text).requires_grad_()  # (B, D)
        # 2. loss and its gradient w.r.t. the embeddings; the temperature's own gradient comes in step 3
        scales = {k: v.detach() for k, v in out.items() if k.startswith("logit_")}
        loss = contrastive_loss(loss_fn, all_audio, all_text, scales)
        grad_audio, grad_text = torch.autograd.grad(loss, [all_audio, all_text])
        # 3. re-run each chunk with graph and push the cached gradients through it
        for i, (part, state) in enumerate(zip(chunks, states)):
            rows = slice(i * chunk, i * chunk + part["waves"].shape[0])
            with state.replay():
                out = forward(model, part)
            surrogate = (out["audio_embeds"].float() * grad_audio[rows]).sum() \
                + (out["text_embeds"].float() * grad_text[rows]).sum()
            if i == 0:
                # d loss / d temperature with the embeddings held fixed; its value is the loss itself
                surrogate = surrogate + contrastive_loss(loss_fn, all_audio.detach(), all_text.detach(), out)
            backward(surrogate)
    return loss.detach()
