"""The GPU paths on one CUDA device: embedding, the plain train step, the DeepSpeed engine (bf16, NCCL, ZeRO
checkpoints), and how many CPU cores of ingest one GPU needs.

    python benchmarks/bench_gpu.py                        # on a machine with a CUDA GPU
    python benchmarks/bench_gpu.py --quick                # fewer clips, batch sizes and steps
    python benchmarks/bench_gpu.py --quick --model tiny --device cpu   # a dry run of this script
    ... --json-out gpu.json                               # the rows as JSON too

Model: random-init HTS-AT tiny + RoBERTa-base (`htsat-tiny-roberta`: no hub weights, RoBERTa's 50265-token
vocabulary fed random ids, the byte-level tokenizer for text; bench_peers' model).
- embed: `embed_audio` of in-memory 10 s waves at 48 kHz, per precision and batch size; bf16's accuracy is its
  minimum cosine to the exact fp32 embeddings on decoded MP3/Ogg clips (tests/audio_fixtures' generator). Then
  `embed_audio(paths)` from WAV files per number of decode threads, where the CPU decode sets the pace.
- train: the plain PyTorch step (log-mel inside the step, InfoNCE, backward, fused AdamW) per batch size and
  precision, with bf16's first-step gradient cosine to fp32 on the same batch (in eval mode: see gradcheck).
- gradcheck: bf16 autocast's and TF32's gradient cosine to exact fp32 on one batch, at random init and after
  fp32 training steps, and 40 steps from one init in each precision (all in eval mode: CUDA's dropout draws
  other masks for bf16 tensors than for fp32 ones from the same seed).
- learn: a learnable task (64 tones, each with its own caption) trained from one init in fp32 and in bf16:
  the two loss curves.
- engine: `clap_core.train.engine` on a one-rank NCCL group (the path `clap pretrain scaling.use_gpu=true` runs
  on each GPU worker): DeepSpeed ZeRO 1 (the shipped default), 2 and 3, precision auto (bf16 autocast, fp32
  master weights), steps/s, then write_checkpoint -> a fresh engine's read_checkpoint gives the same
  consolidated weights.
- ingest: CPU seconds per 10 s FLAC clip of the training transform (decode, crop, tokenize) on this host, and
  the cores one GPU needs to feed the engine's bf16 rate.
GPU timings synchronise the device before reading the clock; each figure is the median of its timed repeats.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SR, SECONDS = 48_000, 10
MODEL = "htsat-tiny-roberta"  # --model: a registry name (`tiny` for a dry run of this script on CPU)


def model_config():
    from clap_core.model.config import get_model_config

    return get_model_config(MODEL, ["text_encoder.pretrained=null", "text_encoder.tokenizer=bytes"])


def build_model(device: torch.device):
    from clap_core.model.clap import ClapModel

    torch.manual_seed(0)
    return ClapModel(model_config()).to(device)


def token_ids(batch: int, seed: int) -> torch.Tensor:
    """(batch, 32) random ids of the model's vocabulary, <s> ... </s> (bench_peers' text)."""
    vocab = model_config().text_encoder.hf_config.get("vocab_size", 260)
    ids = torch.randint(3, vocab, (batch, 32), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = 0, 2
    return ids


def synth_waves(n: int, seed: int = 1) -> list[np.ndarray]:
    """n clips of 10 s: 0.1 * noise + 0.3 * a tone (bench_peers' files, in memory)."""
    rng, t = np.random.default_rng(seed), np.arange(SR * SECONDS) / SR
    return [(0.1 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t)).astype(np.float32)
            for i in range(n)]


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up, the device synchronised around each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float:
    """Peak device memory since the last call, in GiB (0 on CPU)."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def contrastive_loss(model, precision: str, waves: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The model's InfoNCE loss on (waves, ids) under `precision` (the fp32 embeddings of bf16 towers), and the
    model's outputs."""
    from clap_core.model.inference import autocast
    from clap_core.train.loss import ClipLoss

    with autocast(model, precision):
        out = model(waves, ids, torch.ones_like(ids))
        loss = ClipLoss()(out["audio_embeds"].float(), out["text_embeds"].float(), *model.logit_scales(),
                          output_dict=False)
    return loss, out


def grads_by_module(model) -> dict[str, torch.Tensor]:
    """{top-level module: its parameters' gradients, flat, in float64} for the modules that have one."""
    grads: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads.setdefault(name.split(".")[0], []).append(param.grad.flatten().double())
    return {part: torch.cat(grads[part]) for part in sorted(grads)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def embed_rows(device: torch.device, quick: bool) -> list[dict]:
    import soundfile as sf

    from clap_core.model.inference import embed_audio, load_waveform
    from tests.fixtures.audio import decoded_clips

    model = build_model(device).eval()
    waves = synth_waves(64 if quick else 256)
    clips = decoded_clips([10.0, 7.0, 10.0, 4.0, 10.0, 13.0, 10.0, 2.5])
    exact = embed_audio(model, clips, sample_rate=SR, precision="fp32")
    rows = []
    for precision in ("fp32", "bf16"):
        cosine = float((exact * embed_audio(model, clips, sample_rate=SR, precision=precision)).sum(1).min())
        for batch in (32, 128):
            seconds = timed(lambda: embed_audio(model, waves, sample_rate=SR, batch_size=batch,
                                                precision=precision), 2 if quick else 3)
            rows.append(dict(case="embed waves", precision=precision, batch=batch, clips_per_s=len(waves) / seconds,
                             min_cosine_to_fp32=cosine))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, wave in enumerate(waves[:64]):
            paths.append(str(Path(tmp) / f"clip_{i:03d}.wav"))
            sf.write(paths[-1], wave, SR, subtype="PCM_16")
        decode = timed(lambda: [load_waveform(p, None) for p in paths], 2)  # embed_audio's own decode, 1 thread
        for threads in (1, 4, 8):
            seconds = timed(lambda: embed_audio(model, paths, batch_size=32, precision="bf16",
                                                decode_threads=threads), 2)
            rows.append(dict(case="embed files", precision="bf16", batch=32, decode_threads=threads,
                             clips_per_s=len(paths) / seconds, one_thread_decode_only_clips_per_s=len(paths) / decode))
    return rows


def train_rows(device: torch.device, quick: bool) -> list[dict]:
    from clap_core.train.optim import adamw_kernel

    rows = []
    for batch in ((8, 64) if quick else (8, 64, 128)):
        wave = torch.from_numpy(np.stack(synth_waves(batch, seed=2))).to(device)  # (B, 480000)
        ids = token_ids(batch, seed=0).to(device)
        reference = None
        for precision in ("fp32", "bf16"):
            model = build_model(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **adamw_kernel(device))
            grads = []

            def step(keep_grad: bool = False):
                opt.zero_grad(set_to_none=True)
                torch.manual_seed(0)  # the same random crops in each precision
                contrastive_loss(model, precision, wave, ids)[0].backward()
                if keep_grad:
                    grads.append(grads_by_module(model))
                opt.step()

            # The first step's gradient, from the same weights in both precisions, in eval mode: CUDA's dropout
            # kernels draw different masks for bf16 and fp32 tensors from the same seed (train mode on this GPU
            # gave cosines of 0.28-0.40), so only eval mode compares precision alone.
            model.eval()
            step(keep_grad=True)
            model.train()
            reference = grads[0] if reference is None else reference
            by_part = {part: cosine(grads[0][part], reference[part]) for part in grads[0]}
            whole = cosine(torch.cat(list(grads[0].values())), torch.cat(list(reference.values())))
            seconds = timed(step, 5 if quick else 10)
            rows.append(dict(case="train step", precision=precision, batch=batch, s_per_step=seconds,
                             samples_per_s=batch / seconds, grad_cosine_to_fp32=whole,
                             grad_cosine_by_module=by_part,
                             peak_gib=peak_gib(device)))  # (the previous model is freed by then)
    return rows


def gradcheck_rows(device: torch.device, quick: bool) -> list[dict]:
    """bf16 autocast's and TF32's gradient cosines to exact fp32 on one batch, at random init and after fp32
    training steps on another batch; then 40 training steps from the same init in fp32 and in bf16 (eval mode
    throughout: dropout off, so the two precisions see the same computation)."""
    batch, steps = 64, 10 if quick else 40
    wave = torch.from_numpy(np.stack(synth_waves(batch, seed=5))).to(device)  # (B, 480000)
    ids = token_ids(batch, seed=5).to(device)
    train_wave = torch.from_numpy(np.stack(synth_waves(batch, seed=6))).to(device)  # the training batch: another
    train_ids = token_ids(batch, seed=6).to(device)

    def loss_of(model, precision: str, waves, token_ids_, tf32: bool = False) -> tuple[torch.Tensor, dict]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            return contrastive_loss(model, precision, waves, token_ids_)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def train(model, precision: str, n: int) -> list[float]:
        opt, losses = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), []
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_of(model, precision, train_wave, train_ids)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        return losses

    def gradients(model, precision: str, tf32: bool = False) -> tuple[dict, float, dict]:
        model.zero_grad(set_to_none=True)
        loss, out = loss_of(model, precision, wave, ids, tf32)
        loss.backward()
        embeds = {k: out[k].detach().float() for k in ("audio_embeds", "text_embeds")}
        return grads_by_module(model), float(loss), embeds

    rows, model = [], build_model(device).eval()
    for trained in (0, steps):
        if trained:
            train(model, "fp32", trained)
        exact, exact_loss, exact_out = gradients(model, "fp32")
        flat = torch.cat(list(exact.values()))
        row = dict(case="gradient precision", batch=batch, fp32_steps_before=trained, loss_fp32=exact_loss)
        for name, precision, tf32 in (("fp32_again", "fp32", False), ("tf32", "fp32", True), ("bf16", "bf16", False)):
            grads, loss, out = gradients(model, precision, tf32)
            row[f"grad_cosine_{name}"] = cosine(torch.cat(list(grads.values())), flat)
            row[f"loss_{name}"] = loss
            if name == "bf16":
                row["bf16_grad_cosine_by_module"] = {k: cosine(grads[k], exact[k]) for k in exact}
                row["bf16_min_embedding_cosine"] = {
                    k: float((out[k] * exact_out[k]).sum(1).div(out[k].norm(dim=1) * exact_out[k].norm(dim=1)).min())
                    for k in out}
        rows.append(row)
    trajectories = {}
    for precision in ("fp32", "bf16"):
        trajectories[precision] = train(build_model(device).eval(), precision, steps)
    rows.append(dict(case="training trajectory", batch=batch, steps=steps,
                     fp32_losses=[round(x, 4) for x in trajectories["fp32"][::max(1, steps // 10)]],
                     bf16_losses=[round(x, 4) for x in trajectories["bf16"][::max(1, steps // 10)]],
                     max_abs_loss_gap=max(abs(a - b) for a, b in zip(*trajectories.values()))))
    return rows


LEARN_LR, LEARN_WARMUP = 1e-4, 20  # the learnable task's AdamW learning rate and linear warmup steps


def learn_rows(device: torch.device, quick: bool) -> list[dict]:
    """A learnable task, trained from one init in fp32 and in bf16 autocast (train mode, dropout on): 64 classes,
    each a tone (220 + 20 c Hz, random phase, fresh noise every step) paired with its own fixed random caption;
    each batch holds every class once. The loss falls from chance (ln 64) only if the towers learn the pairing;
    the two precisions' curves say whether bf16 trains like fp32. AdamW at LEARN_LR after a linear warmup of
    LEARN_WARMUP steps: on the H200, 3e-4 without warmup sent both precisions to exactly chance within 10 steps."""
    classes, steps = 64, 30 if quick else 150
    captions = token_ids(classes, seed=7).to(device)  # (64, 32): class c's caption
    t = torch.arange(SR * SECONDS, device=device) / SR  # (480000,)
    freqs = (220 + 20 * torch.arange(classes, device=device)).float()[:, None]  # (64, 1)
    curves = {}
    for precision in ("fp32", "bf16"):
        model = build_model(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARN_LR)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / LEARN_WARMUP))
        gen = torch.Generator(device=device).manual_seed(0)  # the same audio in both precisions
        losses = []
        for _ in range(steps):
            phase = torch.rand(classes, 1, device=device, generator=gen) * 6.2832
            noise = torch.randn(classes, t.numel(), device=device, generator=gen)
            waves = 0.3 * torch.sin(2 * torch.pi * freqs * t + phase) + 0.1 * noise  # (64, 480000)
            opt.zero_grad(set_to_none=True)
            loss, _ = contrastive_loss(model, precision, waves, captions)
            loss.backward()
            opt.step()
            warmup.step()
            losses.append(float(loss.detach()))
        curves[precision] = losses
    every = max(1, steps // 15)
    tail = max(1, steps // 10)
    return [dict(case="learnable task", classes=classes, steps=steps, lr=LEARN_LR, warmup=LEARN_WARMUP,
                 fp32_losses=[round(x, 3) for x in curves["fp32"][::every]],
                 bf16_losses=[round(x, 3) for x in curves["bf16"][::every]],
                 fp32_last_mean=statistics.mean(curves["fp32"][-tail:]),
                 bf16_last_mean=statistics.mean(curves["bf16"][-tail:]), chance=float(np.log(classes)))]


def engine_rows(device: torch.device, quick: bool) -> list[dict]:
    """One-rank NCCL group; ZeRO 1, 2 and 3 under precision auto; a checkpoint round trip per stage."""
    import torch.distributed as dist

    from clap_core.train.config import load_pretrain_config
    from clap_core.train.engine import (
        TrainState,
        consolidated_state_dict,
        deepspeed_config,
        init_engine,
        read_checkpoint,
        train_step,
        write_checkpoint,
    )
    from clap_core.train.loss import build_loss
    from pipelines.job_configs import default_config_path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
        else:  # a dry run on CPU
            dist.init_process_group("gloo", rank=0, world_size=1)
    batch_size, rows = 64, []
    waves = torch.from_numpy(np.stack(synth_waves(batch_size, seed=3)))
    ids = token_ids(batch_size, seed=1)
    batch = {"waves": waves.to(device), "lengths": torch.full((batch_size,), waves.shape[1]).to(device),
             "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    for stage in (1, 2, 3):
        cfg = load_pretrain_config(default_config_path("pretrain"), [
            f"train.batch_size={batch_size}", f"deepspeed.zero_stage={stage}", "deepspeed.precision=auto"])

        use_gpu = device.type == "cuda"
        engine, loss_fn = init_engine(build_model(device), cfg, use_gpu), build_loss(model_config().loss)
        losses = []
        seconds = timed(lambda: losses.append(float(train_step(engine, loss_fn, batch, cfg))), 5 if quick else 10)
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(engine, tmp, TrainState(step=len(losses)), rank=0)
            saved = consolidated_state_dict(engine)
            restored = init_engine(build_model(device), cfg, use_gpu)
            state = read_checkpoint(restored, tmp)
            back = consolidated_state_dict(restored)
        same = all(torch.equal(saved[k], back[k]) for k in saved)
        autocast = deepspeed_config(cfg, use_gpu).get("torch_autocast", {"dtype": "fp32 (no autocast)"})
        rows.append(dict(case="deepspeed engine", zero_stage=stage, batch=batch_size, precision=autocast["dtype"],
                         s_per_step=seconds, samples_per_s=batch_size / seconds, first_loss=losses[0],
                         last_loss=losses[-1], checkpoint_round_trip_equal=same, resumed_step=state.step,
                         peak_gib=peak_gib(device)))
    dist.destroy_process_group()
    return rows


def ingest_row(gpu_samples_per_s: float, clips: int) -> dict:
    """CPU seconds per 10 s FLAC clip of the training transform, and the cores that feed `gpu_samples_per_s`."""
    import soundfile as sf

    from clap_core.train.batching import PairBatchTransform

    audio = []
    for wave in synth_waves(clips, seed=4):
        buf = io.BytesIO()
        sf.write(buf, wave, SR, format="FLAC", subtype="PCM_16")
        audio.append(buf.getvalue())
    rows = {"id": np.array([f"c{i}" for i in range(clips)], dtype=object), "audio": np.array(audio, dtype=object),
            "caption": np.array(["a tone over noise"] * clips, dtype=object)}
    transform = PairBatchTransform.for_model(model_config(), training=True)
    transform({k: v[:4] for k, v in rows.items()})  # tokenizer build
    start = time.process_time()
    transform(rows)
    per_clip = (time.process_time() - start) / clips
    return dict(case="ingest", clip_seconds=SECONDS, cpu_ms_per_clip=per_clip * 1e3, clips_per_core_s=1 / per_clip,
                gpu_samples_per_s=gpu_samples_per_s, cores_per_gpu=gpu_samples_per_s * per_clip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer clips, batch sizes and steps")
    parser.add_argument("--cases", default="embed,train,gradcheck,learn,engine,ingest")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--model", default=MODEL, help="registry name; `tiny --device cpu` dry-runs the script")
    parser.add_argument("--device", default="cuda", help="cuda (the figures) or cpu (a dry run)")
    args = parser.parse_args()
    globals()["MODEL"] = args.model
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device (torch.cuda.is_available() is False)")
    device, cases = torch.device(args.device), args.cases.split(",")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL's device_id needs the index
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the exact path the cosines compare with
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, model {args.model}", flush=True)
    rows: list[dict] = []
    for name, fn in (("embed", embed_rows), ("train", train_rows), ("gradcheck", gradcheck_rows),
                     ("learn", learn_rows), ("engine", engine_rows)):
        if name in cases:
            for row in fn(device, args.quick):
                print("ROW " + json.dumps(row), flush=True)
                rows.append(row)
    if "ingest" in cases:
        engine = [r["samples_per_s"] for r in rows if r["case"] == "deepspeed engine"]
        row = ingest_row(max(engine) if engine else float("nan"), 32 if args.quick else 128)
        print("ROW " + json.dumps(row), flush=True)
        rows.append(row)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": name, "model": args.model, "rows": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
