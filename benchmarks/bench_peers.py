"""This project's embedding paths and train step side by side with LAION-CLAP and transformers, in one run.

    python benchmarks/bench_peers.py                                  # our paths only
    python benchmarks/bench_peers.py --peers-python ~/.cache/clap-peers/venv/bin/python   # + the peers
    python benchmarks/bench_peers.py --cases train --peers-python ...  # the train step only
    python benchmarks/bench_peers.py --peers-python ... --interleave 12   # LAION-CLAP's calls and ours alternating

Embedding case: 32 wav files of 10 s at 48 kHz (the peers' harness files: noise + a tone, PCM-16), random-init
HTS-AT tiny + RoBERTa-base, 2 torch threads, `ClapModel.embed_audio(paths, batch_size=8)` with each
precision, `OnnxTowers.embed_audio` on the model's ONNX export, fp32 and int8, and `clap embed` itself (the
Ray Data job, default precision; "job-onnx-int8": from the int8 export; "job-local": in process, no Ray, what
it runs for a small manifest with no cluster) on the same files listed JOB_COPIES times,
end to end and in steady state (benchmarks/embed_jobs.py: the marginal rate between a job of the first quarter of
the rows and the whole; the one-clip job's fixed cost in the row's detail); the peers run
/work/shared/peers/peer_bench.py (`laion_filelist`, `hf_data`) in their own environment. Each path's accuracy
is its minimum cosine to our exact fp32 embeddings on decoded MP3/Ogg clips (tests/audio_fixtures; the
`clap embed` rows: on the 32 wav files).
Train case (peer_bench's `laion_train`): batch 8 of 10 s noise at 48 kHz + random token ids of length 32, the
log-mel front end inside the step, InfoNCE, backward, AdamW (lr 1e-4, wd 0.01; ours with build_optimizer's fused
kernel), plain PyTorch on CPU; the mean of --train-steps steps (5) after a warm-up, in fp32 and under bf16 autocast (fp32 weights
and optimizer), each with its gradient's cosine to the fp32 step's on the same batch. Lines `RESULT {json}` are
what peer_bench's --extra reads.
Machines are noisy: compare only ratios of one run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEERS = REPO.parent / "shared" / "peers" / "peer_bench.py"  # ../shared/peers beside the checkout
N_CLIPS, SR, SECONDS = 32, 48_000, 10
JOB_COPIES = 4  # `clap embed` rows: the 32 files 4 times (128 ids), so that a job's steady state is measurable


def peer_model():
    """The peers' model on this project's side: random-init HTS-AT tiny + RoBERTa-base (byte tokenizer: nothing
    downloaded), seed 0."""
    import torch

    from clap_core.model.clap import ClapModel
    from clap_core.model.config import get_model_config

    torch.manual_seed(0)
    return ClapModel(get_model_config("htsat-tiny-roberta", ["text_encoder.pretrained=null",
                                                             "text_encoder.tokenizer=bytes"]))


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
    """embed_audio from the 32 files per path: a precision of ClapModel ("fp32", "bf16", "auto", "int8": the int8
    encoder, compiled in the warm-up when the cache does not hold it yet), or ONNX Runtime
    on this model's `clap export --format onnx` ("onnx": fp32; "onnx-int8": --quantize int8) through
    OnnxTowers.embed_audio (log-mel graph, 2 threads; the export is timed apart, before)."""
    import torch

    from tests.fixtures.audio import decoded_clips

    torch.set_num_threads(2)
    model = peer_model().eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_wavs(Path(tmp))
        clips = decoded_clips([10.0, 7.0, 10.0, 4.0, 10.0, 13.0])
        exact = model.embed_audio(clips, sample_rate=SR, precision="fp32")
        rows = []
        for path in paths:
            if path.startswith("job"):
                rows += _job_rows(model, path, files, Path(tmp), runs)
                continue
            embed, detail = _embedder(model, path, Path(tmp))
            embed(files[:8])  # warm-up
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                out = embed(files)
                times.append(time.perf_counter() - start)
            assert out.shape == (N_CLIPS, 512)
            cosine = float((exact * embed(clips, sample_rate=SR)).sum(1).min())
            impl = f"clap-at-scale embed_audio {path}" if not path.startswith("onnx") else \
                f"clap-at-scale OnnxTowers.embed_audio {path}"
            rows.append(dict(case="laion_filelist", impl=impl,
                             metric="audio embed from 32 wav files", unit="clips/s",
                             median=N_CLIPS / sorted(times)[len(times) // 2], runs=runs,
                             detail={"min_cosine_to_fp32": round(cosine, 6), **detail}))
    return rows


def _embedder(model, path: str, tmp: Path):
    """(embed(audio, sample_rate=None) -> (N, D), detail) for one of our_paths' paths."""
    if not path.startswith("onnx"):
        return (lambda audio, sample_rate=None:
                model.embed_audio(audio, sample_rate=sample_rate, batch_size=8, precision=path)), {}
    from clap_core.model.onnx_export import OnnxTowers, export_onnx

    start = time.perf_counter()
    folder = export_onnx(model, tmp / path, quantize="int8" if path == "onnx-int8" else None)
    detail = {"export_s": round(time.perf_counter() - start, 1),
              "audio_onnx_MB": round((folder / "audio.onnx").stat().st_size / 2**20, 1)}
    towers = OnnxTowers(folder, threads=2)
    return (lambda audio, sample_rate=None: towers.embed_audio(audio, sample_rate=sample_rate, batch_size=8)), detail


def _job_rows(model, path: str, files: list[str], tmp: Path, runs: int) -> list[dict]:
    """`clap embed` (pipelines.embed.embed_manifest) on a manifest of the files JOB_COPIES times, in a local Ray
    of this machine's CPUs, as `clap embed` starts it: a row end to end and a row in steady state (embed_jobs:
    the marginal rate past the first quarter of the rows), with a one-clip job's fixed cost (actor start,
    imports, model load) in the detail; medians of
    min(runs, 3) jobs after a warm-up job (Ray Data's first use). "job": the checkpoint at the default
    precision; "job-onnx-int8": the int8 ONNX export; "job-local": the checkpoint with `--runner local`, in this
    process and no Ray (what `clap embed` runs for a manifest of <= 1024 rows when no cluster is given);
    "job-int8", "job-local-int8": those two with `--precision int8` (the encoder built in the warm-up job when
    the cache lacks it). Min cosine of the job's embeddings to our exact fp32."""
    import numpy as np
    import ray
    from embed_jobs import time_job, warm_up

    from clap_core.eval.search import load_index

    checkpoint = tmp / path
    if path == "job-onnx-int8":
        from clap_core.model.onnx_export import export_onnx

        export_onnx(model, checkpoint, quantize="int8")
    else:
        model.save_pretrained(checkpoint)
    manifest = tmp / f"{path}.jsonl"
    lines = [json.dumps({"id": f"c{k}-{i:02d}", "audio_path": f, "caption": ""})
             for k in range(JOB_COPIES) for i, f in enumerate(files)]
    manifest.write_text("\n".join(lines) + "\n")
    exact = dict(zip((f"c0-{i:02d}" for i in range(N_CLIPS)), model.embed_audio(files, precision="fp32")))
    runner = "local" if path.startswith("job-local") else "ray"
    precision = "int8" if path in ("job-int8", "job-local-int8") else "auto"
    if runner == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        warm_up(checkpoint, manifest, tmp / f"{path}-out-warm", batch_size=8, runner=runner, precision=precision)
        jobs = [time_job(checkpoint, manifest, tmp / f"{path}-out{r}", batch_size=8, runner=runner,
                         precision=precision)
                for r in range(min(runs, 3))]
        whole, steady = [j.end_to_end for j in jobs], [j.steady for j in jobs]
        index = load_index(str(tmp / f"{path}-out0"))
    finally:
        if runner == "ray":
            ray.shutdown()
    cosine = min(float(np.dot(index.audio[i], exact[name])) for i, name in enumerate(index.ids) if name in exact)
    impl = "clap-at-scale clap embed" + {"job-onnx-int8": " (int8 ONNX export)",
                                         "job-local": " in process (--runner local)",
                                         "job-int8": " --precision int8",
                                         "job-local-int8": " in process --precision int8"}.get(path, "")
    detail = {"min_cosine_to_fp32": round(cosine, 6), "rows": len(lines),
              "fixed_s": round(statistics.median(j.fixed for j in jobs), 2)}
    return [dict(case="laion_filelist", impl=f"{impl} end to end", metric=f"audio embed of {len(lines)} wav files",
                 unit="clips/s", median=statistics.median(whole), runs=len(whole), detail=detail),
            dict(case="laion_filelist", impl=f"{impl} steady state", metric=f"audio embed of {len(lines)} wav files",
                 unit="clips/s", median=statistics.median(steady), runs=len(steady), detail=detail)]


TRAIN_BS, TEXT_LEN, VOCAB = 8, 32, 50265


def our_train_steps(precisions: list[str], steps: int) -> list[dict]:
    """peer_bench's laion_train case on this project's model: s/step per precision + gradient cosine to fp32."""
    import torch

    rows, reference = [], None
    for precision in precisions:
        step, params = train_stepper(precision)
        times = [step(0)]  # step 0: warm-up, and the gradient compared across precisions
        grad = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        times += [step(k) for k in range(1, 1 + steps)]
        reference = grad if reference is None else reference
        # in float64: a float32 cosine over 150M terms came out above 1
        cosine = float(torch.nn.functional.cosine_similarity(grad.double(), reference.double(), dim=0))
        rows.append(dict(case=f"laion_train_L{TEXT_LEN}", impl=f"clap-at-scale train step {precision}",
                         metric=f"train step bs{TRAIN_BS}, 10 s audio, text L={TEXT_LEN}", unit="s/step",
                         median=sum(times[1:]) / steps, runs=steps,
                         detail={"median_s": round(statistics.median(times[1:]), 3),
                                 "steps_s": [round(t, 3) for t in times[1:]],
                                 "grad_cosine_to_" + precisions[0]: round(cosine, 6),
                                 "params_M": round(sum(p.numel() for p in params) / 1e6, 2)}))
    return rows


def train_stepper(precision: str):
    """(step(k) -> seconds, trainable params): peer_bench's laion_train step on this project's model, built once.

    Step k draws its random crop / augment with seed k (the same draws in every precision); step 0 runs with
    stochastic depth off, so that its gradient (left in the params' .grad) compares across precisions: under
    autocast the per-clip draws are made in bf16 and round to other clips dropped than fp32's (a cosine of 0.92,
    not precision)."""
    import numpy as np
    import torch

    from clap_core.model.inference import autocast
    from clap_core.train.loss import ClipLoss
    from clap_core.train.optim import adamw_kernel

    torch.set_num_threads(2)
    wave = torch.from_numpy((0.1 * np.random.default_rng(2).standard_normal((TRAIN_BS, SR * SECONDS)))
                            .astype(np.float32))  # (8, 480000)
    ids = torch.randint(3, VOCAB, (TRAIN_BS, TEXT_LEN), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    mask = torch.ones_like(ids)
    loss_fn = ClipLoss()
    model = peer_model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    # our optimizer's kernel (build_optimizer: fused AdamW), with the peers' hyper-parameters
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **adamw_kernel(model.device))
    drop_paths = [(m, m.drop_prob) for m in model.modules() if type(m).__name__ == "ClapDropPath"]

    def step(k: int) -> float:
        for module, rate in drop_paths:
            module.drop_prob = 0.0 if k == 0 else rate
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(k)
        with autocast(model, precision):
            out = model(wave, ids, mask)
            loss = loss_fn(out["audio_embeds"].float(), out["text_embeds"].float(), *model.logit_scales(),
                           output_dict=False)
        loss.backward()
        opt.step()  # AdamW reads the gradient and leaves it in .grad until the next step's zero_grad
        return time.perf_counter() - start
    return step, params


def peer_rows(python: str, runs: int, cases: list[str], steps: int) -> list[dict]:
    """The peers' harness with their interpreter for both LAION-CLAP and transformers; rows from its JSON."""
    only = (["laion_filelist", "hf_data"] if "embed" in cases else []) + (["laion_train"] if "train" in cases else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        subprocess.run([python, str(PEERS), "--repeat", "1", "--runs", str(runs), "--only", ",".join(only),
                        "--steps", str(steps), "--text-lens", str(TEXT_LEN),
                        "--laion-python", python, "--hf-python", python, "--json-out", str(out)],
                       check=True, timeout=3600, env=dict(os.environ, HF_HUB_OFFLINE="1",  # its offline stand-ins
                                                          HF_HOME=os.path.expanduser("~/.cache/clap-peers/hf")))
        return json.loads(out.read_text())["rows"]


def interleaved_rows(python: str, rounds: int, cases: list[str], paths: list[str],
                     precisions: list[str]) -> list[dict]:
    """Our calls and LAION-CLAP's alternating one at a time, `rounds` times after two warm-ups of each.

    LAION-CLAP stays loaded in its environment (peer_server.py) and times one filelist call or one train step
    per request; ours run here. Each round times LAION-CLAP's call and each of ours back to back (whose turn
    comes first alternates), and its ratio is taken within the round, so a slow minute of a shared machine moves
    both sides of it: the median and range of these ratios say more than two whole cases run minutes apart.
    Embedding: our `paths` (embed_audio per precision, or the ONNX ones) against the filelist call, as a speed
    multiple of LAION-CLAP's clips/s. Train: each of our `precisions` against LAION-CLAP's step, as a multiple
    of its step time."""
    import torch

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "peer_server.log").open("w+") as log:
        # the log takes LAION-CLAP's and transformers' warnings; read back if the server fails
        server = subprocess.Popen(
            [python, str(REPO / "benchmarks" / "peer_server.py"), "--peers-dir", str(PEERS.parent),
             "--workdir", str(Path(tmp) / "peers"), "--text-len", str(TEXT_LEN)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=os.path.expanduser("~/.cache/clap-peers/hf")))

        def laion(case: str) -> float:
            server.stdin.write(json.dumps({"case": case}) + "\n")
            server.stdin.flush()
            for line in server.stdout:  # LAION-CLAP prints lines of its own
                if line.startswith("TIMED "):
                    return json.loads(line[6:])["s"]
            log.seek(0)
            tail = "\n".join(log.read().splitlines()[-5:])
            raise RuntimeError(f"peer_server.py ended (exit code {server.wait()}):\n{tail}")

        try:
            if "embed" in cases:
                ours = _interleave_embedders(paths, Path(tmp))
                rows += _interleave("filelist", lambda: laion("filelist"), ours, rounds, speed=True)
            if "train" in cases:
                steppers = {p: train_stepper(p)[0] for p in precisions}
                # step k draws with seed k; k = 0 (stochastic depth off) is for the gradient check only
                ours = {p: (lambda step=step, k=itertools.count(1): step(next(k))) for p, step in steppers.items()}
                rows += _interleave("train", lambda: laion("train"), ours, rounds, speed=False)
        finally:
            server.stdin.close()  # its loop ends at end of input
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return rows


def _interleave_embedders(paths: list[str], tmp: Path) -> dict:
    """{path: () -> seconds of one embed_audio of the 32 wav files} for our_paths' in-process paths."""
    model = peer_model().eval()
    files = make_wavs(tmp)
    timers = {}
    for path in paths:
        embed, _ = _embedder(model, path, tmp)

        def call(embed=embed) -> float:
            start = time.perf_counter()
            assert embed(files).shape == (N_CLIPS, 512)
            return time.perf_counter() - start
        timers[path] = call
    return timers


def _interleave(case: str, laion, ours: dict, rounds: int, speed: bool) -> list[dict]:
    """Rows of per-round ratios (ours against LAION-CLAP's call of the same round): speed multiples for
    embedding (LAION-CLAP's seconds / ours), step-time multiples for training (ours / LAION-CLAP's)."""
    for _ in range(2):  # warm-up: LAION-CLAP's first timed train step after one warm-up still took 12 s
        laion()
        for call in ours.values():
            call()
    laion_s, ours_s = [], {name: [] for name in ours}
    for r in range(rounds):
        if r % 2:
            laion_s.append(laion())
        for name, call in ours.items():
            ours_s[name].append(call())
        if not r % 2:
            laion_s.append(laion())
    rows = []
    for name, times in ours_s.items():
        ratios = [(t_laion / t if speed else t / t_laion) for t, t_laion in zip(times, laion_s)]
        laion_med, ours_med = statistics.median(laion_s), statistics.median(times)
        rows.append(dict(case=f"interleaved_{case}", impl=f"clap-at-scale {name}",
                         metric=f"{'speed' if speed else 'step time'} x LAION-CLAP, within each round",
                         unit="x LAION", median=statistics.median(ratios), runs=rounds,
                         detail={"ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                                 "ratio_of_medians": round(laion_med / ours_med if speed else ours_med / laion_med, 3),
                                 # all rounds' clips (steps) over all their seconds: throughput, slow calls included
                                 "ratio_of_totals": round(sum(laion_s) / sum(times) if speed
                                                          else sum(times) / sum(laion_s), 3),
                                 "ratios": [round(x, 3) for x in ratios], "ours_s": [round(t, 3) for t in times],
                                 "laion_s": [round(t, 3) for t in laion_s]}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-python", default=None, help="the peers' venv python (see ../shared/peers)")
    parser.add_argument("--paths", default=None,
                        help="our paths to time: precisions (fp32, bf16, auto, int8), onnx, onnx-int8, and clap "
                             "embed: job-local (in process), job (the Ray job), job-onnx-int8, job-int8, "
                             "job-local-int8 (default: fp32, bf16 "
                             "where the CPU computes it natively, int8 where torchao is installed, job-local, job, "
                             "and the onnx paths where onnxruntime is installed)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cases", default="embed,train", help="embed, train or both")
    parser.add_argument("--train-steps", type=int, default=5,
                        help="timed train steps per precision and for LAION-CLAP, after one warm-up step")
    parser.add_argument("--train-precisions", default=None,
                        help="our train step's precisions, fp32 first (default: as --paths)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="with --peers-python: instead of whole cases one after the other, alternate "
                             "LAION-CLAP's calls and ours one at a time for ROUNDS rounds and report the ratio "
                             "within each round (embedding: --paths' in-process paths, default auto and int8)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    # bf16 without AVX-512 BF16 / AMX is emulated: 0.26x LAION-CLAP's embedding and a 140 s train step on an
    # AVX2-only EPYC (README), minutes of run for a path that `auto` never takes there. Ask for it by name.
    import torch

    from clap_core.model.inference import native_bf16

    default = "fp32,bf16" if native_bf16(torch.device("cpu")) else "fp32"
    try:
        import onnxruntime  # noqa: F401  (the `onnx` extra)
        onnx_paths = ",onnx,onnx-int8,job-onnx-int8"
    except ImportError:
        onnx_paths = ""
    try:
        import torchao  # noqa: F401  (the `int8` extra)
        int8_path = ",int8"
    except ImportError:
        int8_path = ""
    if args.interleave and not args.peers_python:
        parser.error("--interleave needs --peers-python")
    args.paths = args.paths or ("auto" + int8_path if args.interleave
                                else default + int8_path + ",job-local,job" + onnx_paths)
    args.train_precisions = args.train_precisions or default
    if default == "fp32":
        print("bench_peers: this CPU has no native bf16 (precision auto = fp32 here): bf16 is not timed unless "
              "--paths / --train-precisions name it", flush=True)
    if args.interleave:
        paths = [p for p in args.paths.split(",") if not p.startswith("job")]
        rows = interleaved_rows(args.peers_python, args.interleave, cases, paths, args.train_precisions.split(","))
        for row in rows:
            print("RESULT " + json.dumps(row), flush=True)
        print(f"\n{'ours against LAION-CLAP, round by round':48s} {'median':>8s} {'range':>13s} {'of medians':>10s}"
              f" {'of totals':>10s}")
        for row in rows:
            d = row["detail"]
            print(f"{row['case'] + ' ' + row['impl'][14:]:48s} {row['median']:8.2f} "
                  f"{d['ratio_min']:6.2f}-{d['ratio_max']:<6.2f} {d['ratio_of_medians']:10.2f}"
                  f" {d['ratio_of_totals']:10.2f}")
        return
    rows = our_paths(args.paths.split(","), args.runs) if "embed" in cases else []
    rows += our_train_steps(args.train_precisions.split(","), args.train_steps) if "train" in cases else []
    if args.peers_python:
        rows += peer_rows(args.peers_python, args.runs, cases, args.train_steps)
    for row in rows:
        print("RESULT " + json.dumps(row), flush=True)
    group = {"hf_data": "laion_filelist"}  # transformers' embedding row beside LAION-CLAP's filelist one
    for case in dict.fromkeys(group.get(r["case"], r["case"]) for r in rows):
        mine = [r for r in rows if group.get(r["case"], r["case"]) == case]
        laion = next((r for r in mine if r["impl"].startswith("laion_clap")), None)
        # train steps: also the median step, which one slow step (a page fault storm, a busy neighbour) leaves alone
        medians = all("median_s" in r.get("detail", {}) for r in mine)
        unit = mine[0]["unit"]
        print(f"\n{'impl':48s} {unit:>8s} {'x LAION':>8s}" + (f" {'median':>8s} {'x LAION':>8s}" if medians else "")
              + "  detail")
        for row in mine:
            line = f"{row['impl'][:48]:48s} {row['median']:8.2f} " + _ratio(row["median"], laion and laion["median"])
            if medians:
                median = row["detail"]["median_s"]
                line += f" {median:8.2f} " + _ratio(median, laion and laion["detail"]["median_s"])
            detail = {k: v for k, v in row.get("detail", {}).items() if "cosine" in k}
            print(f"{line}  {detail or ''}")


def _ratio(value: float, laion: float | None) -> str:
    return f"{value / laion:8.2f}" if laion else "       -"


if __name__ == "__main__":
    main()
