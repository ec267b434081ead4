"""Embedding throughput: `clap embed` (Ray Data: decode tasks + model actor pool) vs a one-file-at-a-time loop.

    python benchmarks/bench_embed.py                 # 160 generated clips of 2-6 s, `tiny`
    python benchmarks/bench_embed.py --clips 400 --model htsat-tiny-roberta
    python benchmarks/bench_embed.py --onnx none     # without the ONNX export's lines (they need onnxruntime)

The baseline decodes and embeds one file per model call, the way LAION-CLAP's
`get_audio_embedding_from_filelist` is used; (b) is the same model in one process with batching
(`ClapModel.embed_audio(paths, batch_size=16)`); (c) is `clap embed`: in this process (`--runner local`, what
it runs for a small manifest when no cluster is given) and as the Ray job on all cores. Same files, same
checkpoint, same machine, in one run: the ratios are what to read, not the absolute clips/s. The job is timed
as benchmarks/embed_jobs.py times it: end to end; its fixed cost, a one-clip job (actor start, imports, model
load) run right after it (the session's first, warm-up job is printed beside it); and the steady state, the
marginal rate between a job of the first quarter of the clips and the whole. The model alone, on the clips decoded
beforehand and batched, is the bound of every steady state on the machine: decoding only adds to it.
With --onnx int8 (the default) or fp32, the checkpoint is also exported (`clap export --format onnx
[--quantize int8]`, timed once: an export is made once and reused) and (b) and (c) run again from the export:
OnnxTowers.embed_audio in one process, and `clap embed --checkpoint EXPORT`; the export's embeddings are
compared with the checkpoint's fp32 ones (min cosine over the clips).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=160)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--onnx", choices=["int8", "fp32", "none"], default="int8",
                        help="also time an ONNX export of the checkpoint (int8: --quantize int8); none: skip")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch
    from embed_jobs import time_job, warm_up

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config
    from clap_core.model.inference import embed_waveforms, load_waveform
    from clap_demo.synth import write_corpus

    offline = [] if args.model == "tiny" else ["text_encoder.pretrained=null", "text_encoder.tokenizer=bytes"]
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        manifest = write_corpus(tmp / "corpus", n_clips=args.clips, seed=0, seconds=(2.0, 6.0))
        paths = [str(manifest.parent / json.loads(line)["audio_path"]) for line in manifest.read_text().splitlines()]
        torch.manual_seed(0)
        ClapModel(get_model_config(args.model, offline)).save_pretrained(tmp / "ckpt")
        model = ClapModel.from_pretrained(tmp / "ckpt")

        start = time.perf_counter()
        for path in paths:  # (a) one file per call
            model.embed_audio(path)
        loop = len(paths) / (time.perf_counter() - start)

        start = time.perf_counter()
        model.embed_audio(paths, batch_size=args.batch_size)  # (b) batched, one process
        batched = len(paths) / (time.perf_counter() - start)

        # the model alone on the clips decoded beforehand: no runner's steady state on this machine exceeds it
        start = time.perf_counter()
        waves = [load_waveform(path, None) for path in paths]
        decode_ms = 1000 * (time.perf_counter() - start) / len(paths)
        embed_waveforms(model, waves[:args.batch_size], args.batch_size)  # warm-up
        start = time.perf_counter()
        embed_waveforms(model, waves, args.batch_size)
        model_only = len(paths) / (time.perf_counter() - start)
        del waves

        if args.onnx != "none":  # (b) from the export: ONNX Runtime in this process
            from clap_core.model.onnx_export import OnnxTowers, export_onnx

            start = time.perf_counter()
            export_onnx(model, tmp / "onnx", quantize="int8" if args.onnx == "int8" else None)
            export_seconds = time.perf_counter() - start
            towers = OnnxTowers(tmp / "onnx", threads=torch.get_num_threads())
            start = time.perf_counter()
            onnx_emb = towers.embed_audio(paths, batch_size=args.batch_size)  # (N, D)
            onnx_batched = len(paths) / (time.perf_counter() - start)
            reference = model.embed_audio(paths, batch_size=args.batch_size, precision="fp32")  # (N, D)
            cosine = float((onnx_emb * reference).sum(1).min())
            del towers

        # (c) in this process, before Ray starts (a user's machine with no cluster has none running), after a
        # one-clip job as the Ray job's (what a process pays once: the runner's imports, its first allocations)
        local_cold = warm_up(tmp / "ckpt", manifest, tmp / "emb_local_cold", args.batch_size, runner="local")
        local = time_job(tmp / "ckpt", manifest, tmp / "emb_local", args.batch_size, runner="local")

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cold = warm_up(tmp / "ckpt", manifest, tmp / "emb_cold", args.batch_size)  # Ray Data's first use
        timed = time_job(tmp / "ckpt", manifest, tmp / "emb", args.batch_size)
        job, steady, fixed = timed.end_to_end, timed.steady, timed.fixed
        if args.onnx != "none":  # (c) from the export, after the checkpoint's jobs: as warm a session
            timed = time_job(tmp / "onnx", manifest, tmp / "emb_onnx", args.batch_size)
            onnx_job, onnx_steady, onnx_fixed = timed.end_to_end, timed.steady, timed.fixed
        ray.shutdown()

    print(f"model {args.model}, {len(paths)} clips of 2-6 s in mixed formats, {os.cpu_count()} cores")
    print("| method | clips/s | vs one-file loop |")
    print("|---|---|---|")
    print(f"| (a) one file per call (LAION-CLAP style) | {loop:.1f} | 1.00 |")
    print(f"| (b) ClapModel.embed_audio, batch {args.batch_size} | {batched:.1f} | {batched / loop:.2f} |")
    print(f"| the model alone on clips decoded beforehand, batch {args.batch_size}: the bound of any steady state "
          f"here (decoding alone: {decode_ms:.0f} ms a clip on one thread) | {model_only:.1f} | "
          f"{model_only / loop:.2f} |")
    print(f"| (c) clap embed in process (--runner local; auto's choice for <= 1024 rows and no cluster), end to end "
          f"(its one-clip job: {local.fixed:.1f} s; the process' first: {local_cold:.1f} s) | {local.end_to_end:.1f} | "
          f"{local.end_to_end / loop:.2f} |")
    print(f"| (c) the same in steady state | {local.steady:.1f} | {local.steady / loop:.2f} |")
    print(f"| (c) clap embed --runner ray (Ray Data, actor pool), end to end | {job:.1f} | {job / loop:.2f} |")
    print(f"| (c) fixed cost: a one-clip job {fixed:.1f} s (the session's first job: {cold:.1f} s) | | |")
    print(f"| (c) steady state: past the first quarter of the clips | {steady:.1f} | {steady / loop:.2f} |")
    if args.onnx != "none":
        name = f"the {args.onnx} ONNX export (made once in {export_seconds:.0f} s; min cosine to fp32 {cosine:.5f})"
        print(f"| (b) OnnxTowers.embed_audio from {name}, batch {args.batch_size} | {onnx_batched:.1f} | "
              f"{onnx_batched / loop:.2f} |")
        print(f"| (c) clap embed --checkpoint EXPORT, end to end | {onnx_job:.1f} | {onnx_job / loop:.2f} |")
        print(f"| (c) the same in steady state (its one-clip job: {onnx_fixed:.1f} s) | {onnx_steady:.1f} | "
              f"{onnx_steady / loop:.2f} |")


if __name__ == "__main__":
    main()
