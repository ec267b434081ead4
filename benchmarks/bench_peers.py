"""This project's embedding paths side by side with LAION-CLAP and transformers, in one run.

    python benchmarks/bench_peers.py                                  # our paths only
    python benchmarks/bench_peers.py --peers-python ~/.cache/clap-peers/venv/bin/python   # + the peers

Case: 32 wav files of 10 s at 48 kHz (the peers' harness files: noise + a tone, PCM-16), random-init
HTS-AT tiny + RoBERTa-base, 2 torch threads, `ClapModel.embed_audio(paths, batch_size=8)` with each
precision / runtime; the peers run /work/shared/peers/peer_bench.py (`laion_filelist`, `hf_data`) in their
own environment. Each path's accuracy is its minimum cosine to our exact fp32 embeddings on decoded
MP3/Ogg clips (tests/audio_fixtures). Lines `RESULT {json}` are what peer_bench's --extra reads.
Machines are noisy: compare only ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEERS = REPO.parent / "shared" / "peers" / "peer_bench.py"  # ../shared/peers beside the checkout
N_CLIPS, SR, SECONDS = 32, 48_000, 10


def make_wavs(folder: Path) -> list[str]:
    """The peers' 32 files: 0.1 * noise + 0.3 * sine (220 + 20 i Hz), 10 s, PCM-16."""
    import numpy as np
    import soundfile as sf

    rng, t = np.random.default_rng(1), np.arange(SR * SECONDS) / SR
    files = []
    for i in range(N_CLIPS):
        x = 0.1 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t)
        files.append(str(folder / f"clip_{i:02d}.wav"))
        sf.write(files[-1], x.astype(np.float32), SR, subtype="PCM_16")
    return files


def our_paths(paths: list[str], runs: int) -> list[dict]:
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config
    from tests.fixtures.audio import decoded_clips

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = ClapModel(get_model_config("htsat-tiny-roberta", ["text_encoder.pretrained=null",
                                                               "text_encoder.tokenizer=bytes"])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_wavs(Path(tmp))
        clips = decoded_clips([10.0, 7.0, 10.0, 4.0, 10.0, 13.0])
        exact = model.embed_audio(clips, sample_rate=SR, precision="fp32")
        rows = []
        for precision in paths:
            model.embed_audio(files[:8], batch_size=8, precision=precision)  # warm-up
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                out = model.embed_audio(files, batch_size=8, precision=precision)
                times.append(time.perf_counter() - start)
            assert out.shape == (N_CLIPS, 512)
            cosine = float((exact * model.embed_audio(clips, sample_rate=SR, precision=precision)).sum(1).min())
            rows.append(dict(case="laion_filelist", impl=f"clap-at-scale embed_audio {precision}",
                             metric="audio embed from 32 wav files", unit="clips/s",
                             median=N_CLIPS / sorted(times)[len(times) // 2], runs=runs,
                             detail={"min_cosine_to_fp32": round(cosine, 6)}))
    return rows


def peer_rows(python: str, runs: int) -> list[dict]:
    """The peers' harness with their interpreter for both LAION-CLAP and transformers; rows from its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        subprocess.run([python, str(PEERS), "--repeat", "1", "--runs", str(runs), "--only", "laion_filelist,hf_data",
                        "--laion-python", python, "--hf-python", python, "--json-out", str(out)],
                       check=True, timeout=3600, env=dict(os.environ, HF_HUB_OFFLINE="1",  # its offline stand-ins
                                                          HF_HOME=os.path.expanduser("~/.cache/clap-peers/hf")))
        return json.loads(out.read_text())["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-python", default=None, help="the peers' venv python (see ../shared/peers)")
    parser.add_argument("--paths", default="fp32,bf16", help="our precisions to time")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    rows = our_paths(args.paths.split(","), args.runs)
    if args.peers_python:
        rows += peer_rows(args.peers_python, args.runs)
    for row in rows:
        print("RESULT " + json.dumps(row), flush=True)
    laion = next((r["median"] for r in rows if r["impl"].startswith("laion_clap")), None)
    print(f"\n{'impl':48s} {'clips/s':>8s} {'x LAION':>8s}  min cos to fp32")
    for row in rows:
        ratio = f"{row['median'] / laion:8.2f}" if laion else "       -"
        cos = row.get("detail", {}).get("min_cosine_to_fp32", "")
        print(f"{row['impl'][:48]:48s} {row['median']:8.2f} {ratio}  {cos}")


if __name__ == "__main__":
    main()
