"""Validation during pretraining: every worker holds the validation split, each embeds a 1/W share of it.

    valid = ValidSet(numpy_batches, model_cfg, limit=1024)      # once per worker
    metrics = evaluate(model, valid, batch_size=64, rank=r, world=W, device=dev)   # all ranks call (all_gather)
    probe = engine_probe(model, valid, device)                   # a few pairs' embeddings, to check the export

Ranks embed rows rank, rank+W, ... (padded so every rank runs the same number of forwards) and all-gather
them back into row order, so the metrics equal those of one process embedding everything.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from clap_core.data.shards import is_augmented_copy
from clap_core.eval.metrics import retrieval_metrics
from clap_core.model.clap import ClapModel
from clap_core.model.config import ClapModelConfig
from clap_core.train.batching import PairBatchTransform, decode_rows, trim_padding

PROBE_CLIPS = 4  # validation pairs whose engine embeddings are saved to check the export


class ValidSet:
    """Validation clips (centre-cropped waves) and all their captions, loaded once per worker.

    batches: numpy batches of shard rows with id, audio, caption, captions, augment (a Ray Data shard's
    `iter_batches(batch_format="numpy")`, or any iterable of such dicts).
    """

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], model_cfg: ClapModelConfig, limit: int):
        audio, captions = [], []
        for batch in batches:
            for i in range(len(batch["audio"])):  # one row per source clip: augmented copies would cap R@1
                if is_augmented_copy({"id": batch["id"][i], "augment": batch["augment"][i]}):
                    continue
                audio.append(batch["audio"][i])
                c = batch["captions"][i]
                captions.append(list(c) if c is not None and len(c) else [batch["caption"][i]])
        audio, captions = audio[:limit], captions[:limit]
        transform = PairBatchTransform.for_model(model_cfg, training=False)
        self.waves, self.lengths, failures = decode_rows(audio, transform.clip_samples, None)  # (N, S), (N,)
        captions = [c for i, c in enumerate(captions) if i not in failures]  # bad validation rows are left out
        self.texts = [c for caps in captions for c in caps]  # (Nt,)
        self.text_to_audio = np.array([i for i, caps in enumerate(captions) for _ in caps])  # (Nt,)
        self.tokens = transform.tokenize(self.texts)
        self.main_caption_rows = np.cumsum([0] + [len(caps) for caps in captions[:-1]])  # first caption of each clip

    def __len__(self) -> int:
        return len(self.waves)


def rank_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Rows rank, rank+W, ... padded (repeating row 0) to ceil(n/W) so every rank runs the same forwards."""
    per_rank = -(-n // world)
    rows = np.arange(rank, per_rank * world, world)
    return np.where(rows < n, rows, 0)


def gather_rows(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Inverse of rank_rows: (ceil(n/W), D) per rank -> (n, D) in row order (all ranks must call)."""
    if world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, local.shape[-1])[:n]  # row r*... interleaved back


@torch.no_grad()
def embed_valid(model: ClapModel, valid: ValidSet, batch_size: int, rank: int, world: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Na, D) audio and (Nt, D) text embeddings of the validation set, work split across ranks."""
    audio_rows = rank_rows(len(valid), rank, world)
    text_rows = rank_rows(len(valid.texts), rank, world)
    audio, text = [], []
    for i in range(0, len(audio_rows), batch_size):
        rows = audio_rows[i:i + batch_size]
        audio.append(model.encode_audio(torch.from_numpy(valid.waves[rows]).to(device),
                                        lengths=torch.from_numpy(valid.lengths[rows]).to(device)).float())
    for i in range(0, len(text_rows), batch_size):
        rows = text_rows[i:i + batch_size]
        ids, mask = trim_padding(valid.tokens["input_ids"][rows], valid.tokens["attention_mask"][rows])
        text.append(model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float())
    return (gather_rows(torch.cat(audio), len(valid), world).cpu(),
            gather_rows(torch.cat(text), len(valid.texts), world).cpu())


def evaluate(model: ClapModel, valid: ValidSet, batch_size: int, rank: int, world: int,
             device: torch.device) -> dict[str, float]:
    """{'val/t2a/R@1': ..., ...}: retrieval metrics of the validation set, the same on every rank."""
    model.eval()
    try:
        audio, text = embed_valid(model, valid, batch_size, rank, world, device)
    finally:
        model.train()
    metrics = retrieval_metrics(audio.numpy(), text.numpy(), valid.text_to_audio)
    return {f"val/{k}": v for k, v in metrics.items()}


@torch.no_grad()
def engine_probe(model: ClapModel, valid: ValidSet, device: torch.device) -> dict[str, np.ndarray]:
    """The trained model's inputs and embeddings of a few validation pairs, to check the export against."""
    model.eval()
    rows = np.arange(min(PROBE_CLIPS, len(valid)))
    text_rows = valid.main_caption_rows[rows]
    ids, mask = trim_padding(valid.tokens["input_ids"][text_rows], valid.tokens["attention_mask"][text_rows])
    audio = model.encode_audio(torch.from_numpy(valid.waves[rows]).to(device),
                               lengths=torch.from_numpy(valid.lengths[rows]).to(device))
    text = model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
    model.train()
    return {"waves": valid.waves[rows], "lengths": valid.lengths[rows], "input_ids": ids, "attention_mask": mask,
            "audio_embeds": audio.float().cpu().numpy(), "text_embeds": text.float().cpu().numpy()}
