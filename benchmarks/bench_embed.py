"""Embedding throughput: `clap embed` (Ray Data: decode tasks + model actor pool) vs a one-file-at-a-time loop.

    python benchmarks/bench_embed.py                 # 160 generated clips of 2-6 s, `tiny`
    python benchmarks/bench_embed.py --clips 400 --model htsat-tiny-roberta

The baseline decodes and embeds one file per model call, the way LAION-CLAP's
`get_audio_embedding_from_filelist` is used; (b) is the same model in one process with batching
(`ClapModel.embed_audio(paths, batch_size=16)`); (c) is the Ray job on all cores. Same files, same
checkpoint, same machine, in one run: the ratios are what to read, not the absolute clips/s. A job's
fixed cost (starting the actor process, importing torch and transformers, loading the model) is a one-clip
job run right after the measured one, in the same warm session; it is taken out for the steady-state line,
since it vanishes at corpus scale. (The session's first job costs more: Ray Data's first use; it is printed
beside it, and taking it out instead would overstate the steady state.)
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
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config
    from clap_demo.synth import write_corpus
    from pipelines.embed import embed_manifest

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

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        one = manifest.with_name("one.jsonl")  # beside the manifest: same relative audio paths
        one.write_text(manifest.read_text().splitlines()[0] + "\n")

        def one_clip_job(name: str) -> float:  # a job's fixed cost: actor process, imports, model load
            start = time.perf_counter()
            embed_manifest(str(tmp / "ckpt"), str(one), str(tmp / name), batch_size=args.batch_size, text=False)
            return time.perf_counter() - start

        cold = one_clip_job("emb_cold")  # the session's first job also pays Ray Data's first-use costs
        start = time.perf_counter()
        summary = embed_manifest(str(tmp / "ckpt"), str(manifest), str(tmp / "emb"), batch_size=args.batch_size,
                                 text=False)
        seconds = time.perf_counter() - start
        fixed = one_clip_job("emb_warm")  # the same conditions as the job above: what it paid before its rows
        job, steady = summary["rows"] / seconds, summary["rows"] / max(seconds - fixed, 1e-9)
        ray.shutdown()

    print(f"model {args.model}, {len(paths)} clips of 2-6 s in mixed formats, {os.cpu_count()} cores")
    print("| method | clips/s | vs one-file loop |")
    print("|---|---|---|")
    print(f"| (a) one file per call (LAION-CLAP style) | {loop:.1f} | 1.00 |")
    print(f"| (b) ClapModel.embed_audio, batch {args.batch_size} | {batched:.1f} | {batched / loop:.2f} |")
    print(f"| (c) clap embed (Ray Data, actor pool), end to end | {job:.1f} | {job / loop:.2f} |")
    print(f"| (c) without the {fixed:.1f} s fixed cost of a job (steady state; the session's first job: "
          f"{cold:.1f} s) | {steady:.1f} | {steady / loop:.2f} |")


if __name__ == "__main__":
    main()
