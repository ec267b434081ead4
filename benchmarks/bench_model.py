"""Model benchmark on CPU: forward+backward time per sample and peak memory, and the loss' memory.

    python benchmarks/bench_model.py            # tiny + htsat-tiny-roberta at batch 1, 2, 4; loss at 256..4096
    python benchmarks/bench_model.py --quick    # smaller sweep
    python benchmarks/bench_model.py --models htsat-tiny-roberta wav2vec2-roberta whisper-roberta --no-loss

Each measurement runs in a fresh process, so the peak resident memory (ru_maxrss) it reports is its
own; memory is given as the rise over the same process just before the step (model built, inputs
ready). Models are built offline at their registry size (random init: pretrained names are dropped). Times are the median of a few steps after a warm-up. The loss section compares, for a global
batch B over W=8 workers, the logits one rank holds with a full (B x B) loss vs local-loss (B/W x B).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

OFFLINE_TEXT = ["text_encoder.pretrained=null", "text_encoder.tokenizer=bytes"]
OFFLINE_AUDIO = ["audio_encoder.pretrained=null"]  # speech towers: build wav2vec2 / Whisper from hf_config


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_step(name: str, batch: int, steps: int, queue: mp.Queue) -> None:
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config
    from clap_core.train.loss import ClipLoss

    torch.manual_seed(0)
    cfg = get_model_config(name)
    overrides = [] if cfg.text_encoder.pretrained is None else list(OFFLINE_TEXT)
    overrides += OFFLINE_AUDIO if getattr(cfg.audio_encoder, "pretrained", None) else []
    model = ClapModel(get_model_config(name, overrides)).train()
    waves = torch.randn(batch, model.frontend.clip_samples) * 0.1
    tokens = model.tokenize([f"caption number {i} of a sound" for i in range(batch)])
    loss_fn = ClipLoss()
    before = rss_mb()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(waves, **tokens)
        loss = loss_fn(out["audio_embeds"], out["text_embeds"], out["logit_scale"])["contrastive_loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    queue.put((statistics.median(times[1:]) / batch, rss_mb() - before))


def loss_step(global_batch: int, workers: int, local: bool, queue: mp.Queue) -> None:
    import torch
    import torch.nn.functional as F

    dim = 512
    rows = global_batch // workers if local else global_batch
    audio_all = F.normalize(torch.randn(global_batch, dim), dim=-1).requires_grad_()  # (B, D) gathered
    text_all = F.normalize(torch.randn(global_batch, dim), dim=-1).requires_grad_()
    labels = torch.arange(rows)
    before = rss_mb()
    logits_audio = 100 * audio_all[:rows] @ text_all.T  # (rows, B): this rank's audio vs every caption
    logits_text = 100 * text_all[:rows] @ audio_all.T  # (rows, B)
    loss = (F.cross_entropy(logits_audio, labels) + F.cross_entropy(logits_text, labels)) / 2
    loss.backward()
    queue.put((0.0, rss_mb() - before))


def measure(target, *args) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1-2 and smaller loss sizes")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["tiny", "htsat-tiny-roberta"], help="registry names")
    parser.add_argument("--no-loss", action="store_true", help="skip the loss-memory section")
    args = parser.parse_args()
    batches = (1, 2) if args.quick else (1, 2, 4)
    print("| model | batch | fwd+bwd ms/sample | peak extra MB | ms/sample vs batch 1 |")
    print("|---|---|---|---|---|")
    for name in args.models:
        base = None
        for batch in batches:
            per_sample, mem = measure(model_step, name, batch, args.steps)
            base = base or per_sample
            print(f"| {name} | {batch} | {per_sample * 1e3:.1f} | {mem:.0f} | {per_sample / base:.2f} |", flush=True)
    if args.no_loss:
        return
    sizes = (256, 1024) if args.quick else (256, 1024, 4096)
    print("\n| global batch | workers | full-loss MB | local-loss MB | local / full |")
    print("|---|---|---|---|---|")
    for size in sizes:
        full = measure(loss_step, size, 8, False)[1]
        local = measure(loss_step, size, 8, True)[1]
        print(f"| {size} | 8 | {full:.1f} | {local:.1f} | {local / max(full, 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    main()
