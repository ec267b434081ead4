"""MELD probe by audio tower: the demo's MELD corpus, one `clap tune-probe` sweep per tower at the same budget.

    python benchmarks/bench_meld_towers.py --output /tmp/meld_towers          # tiny, HTS-AT, wav2vec 2.0, Whisper
    python benchmarks/bench_meld_towers.py --output /tmp/m --models tiny tiny-wav2vec2 --trials 4

Every tower is randomly initialised (seed 0) and built offline at its registry size: no pretrained weights
are downloaded, so the numbers compare what each architecture's frozen random features carry about the
synthetic emotions (pitch, pulse rate, loudness), not pretrained speech knowledge. The probe uses the audio
side only (`probe.mode=audio`): the demo's utterances carry cue words that make the text side trivial.
Speech towers also sweep their layer choice (CLAP embedding / last layer / weighted layers).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OFFLINE = {"text": ["text_encoder.pretrained=null", "text_encoder.tokenizer=bytes"],
           "audio": ["audio_encoder.pretrained=null"]}


def checkpoint_for(name: str, folder: Path) -> str:
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config

    cfg = get_model_config(name)
    overrides = (OFFLINE["text"] if cfg.text_encoder.pretrained else []) + \
        (OFFLINE["audio"] if getattr(cfg.audio_encoder, "pretrained", None) else [])
    torch.manual_seed(0)
    ClapModel(get_model_config(name, overrides)).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="work folder (corpus, checkpoints, sweeps)")
    parser.add_argument("--models", nargs="+", default=["tiny", "htsat-tiny-roberta", "wav2vec2-roberta",
                                                         "whisper-roberta"])
    parser.add_argument("--trials", type=int, default=6, help="probe trials per tower (the demo's budget)")
    args = parser.parse_args()

    from clap_core.eval.probe_config import load_probe_sweep_config
    from clap_demo.synth_meld import write_meld
    from pipelines.job_configs import default_config_path
    from pipelines.tune_probe import tune_probe

    out = Path(args.output).resolve()
    if not (out / "meld").exists():
        write_meld(out / "meld", layout="raw", corrupt=True)  # the demo's corpus
    overrides = [f"tune.num_samples={args.trials}", "tune.max_concurrent_trials=2", "search.epochs=[8, 12]",
                 "probe.mode=audio", "embed.concurrency=1"]
    print("| audio tower | params (audio) | embed + sweep s | best audio features | test weighted F1 | majority |")
    print("|---|---:|---:|---|---:|---:|")
    for name in args.models:
        ckpt = checkpoint_for(name, out / "ckpt" / name)
        from clap_core.model.clap import ClapModel
        n_params = sum(p.numel() for p in ClapModel.from_pretrained(ckpt).audio_encoder.parameters())
        cfg = load_probe_sweep_config(default_config_path("tune_probe"), overrides)
        start = time.perf_counter()
        summary = tune_probe(str(out / "meld"), ckpt, str(out / "sweep" / name), cfg)
        seconds = time.perf_counter() - start
        (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
        test = summary["test"]
        features = summary["best"]["params"].get("audio_features", "embedding")
        print(f"| {name} | {n_params / 1e6:.2f} M | {seconds:.0f} | {features} | "
              f"{test['probe']['weighted_f1']:.3f} | {test['majority_baseline']['weighted_f1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
