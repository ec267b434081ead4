"""`clap embed`: Ray Data batch inference: audio (and caption) embeddings of a manifest or shards to Parquet.

    clap embed --checkpoint runs/a/final --input data/manifest.jsonl --output embeddings/
    clap embed --checkpoint s3://bucket/runs/a/final --input s3://bucket/shards --split test --output s3://bucket/emb
    clap embed --checkpoint onnx-int8/ --input data/manifest.jsonl --output embeddings/   # a `clap export` folder

Stages: rows -> decode (CPU tasks; unreadable rows go to OUTPUT/_rejects/, never a crash) -> embed
(an autoscaling actor pool of --min-workers..--max-workers: the model is loaded once per actor, on a
GPU with --gpus, or when the cluster has one; a `clap export --format onnx` folder runs on CPU actors through
ONNX Runtime, at the precision it was exported in) -> Parquet of
`id`, `audio_embedding`, `text_embedding` and the input's metadata (with `layers=True` and a speech tower,
also `audio_layers`: every tower layer pooled, for layer-wise probes), in the format of clap_core.data.embeddings
(OUTPUT/embeddings.json lists the files and the checkpoint's identity). OUTPUT must be empty or an earlier
output of the same job: nothing else is ever deleted, and a finished job is not re-run (written once). Every
file a run writes is named by its attempt id, so a killed run's late writes are never counted by a re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from clap_core import storage
from clap_core.audio.codec import MAX_CLIP_SECONDS, TARGET_SR, decode_audio
from clap_core.config import CheckpointError, ConfigError
from clap_core.data import embeddings
from clap_core.data.input_rows import audio_source
from clap_core.data.rejects import Reject, failure_reject, reject, write_rejects
from clap_core.io_faults import retry_transient
from clap_core.model.folders import (
    check_checkpoint,
    check_export,
    check_transformers_folder,
    is_onnx_export,
    is_transformers_folder,
)
from clap_core.storage import local_copy
from pipelines.console import init_ray, plan_log
from pipelines.embed_input import local_rows, open_input, ray_dataset
from pipelines.embed_local import RUNNERS, choose_runner, embed_in_process, shard_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="save_pretrained folder, or a `clap export --format onnx` folder (local or s3://)")
    parser.add_argument("--input", required=True, help="manifest (JSONL/CSV) or shard folder (local or s3://)")
    parser.add_argument("--output", required=True, help="output folder (local or s3://)")
    parser.add_argument("--split", default=None, help="only rows of this split")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per model call")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="fixed number of embedding actors (default: the --min-workers..--max-workers range)")
    parser.add_argument("--min-workers", type=int, default=1, help="embedding actors always kept (default 1)")
    parser.add_argument("--max-workers", type=int, default=None,
                        help="embedding actors the pool may grow to; the autoscaler adds nodes for them "
                             "(default: 1 per GPU of the cluster now, else 2)")
    parser.add_argument("--gpus", type=float, default=None,
                        help="GPUs per embedding actor; > 0 asks for GPU actors even before a GPU node exists "
                             "(autoscaling clusters). Default: 1 when the cluster has GPUs now, else CPU only")
    parser.add_argument("--no-text", action="store_true", help="skip caption embeddings")
    parser.add_argument("--runner", choices=RUNNERS, default="auto",
                        help="ray: a Ray Data job; local: in this process, without Ray; auto (default): local "
                             "for an input of at most 1024 rows (a manifest, or a shard split) when no Ray "
                             "cluster is given "
                             "(RAY_ADDRESS, or one of `ray start` on this machine) and no actor-pool option is "
                             "set, else ray")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                        help="auto: bf16 (a bf16 copy of the encoders, under autocast) where the hardware has "
                             "native bf16 (cosine >= 0.999 to fp32), else fp32; fp32: exact; int8 (CPU, "
                             "pip install 'clap-at-scale[int8]'): the audio encoder in static int8, compiled "
                             "once per machine and checkpoint (~2 min, cached), then 1.2-1.6x bf16. An ONNX export "
                             "runs at the precision it was exported in (auto only)")


# --- stage 1: decode (plain batch function on CPU tasks) ---


def decode_batch(batch: dict[str, np.ndarray], output: str, attempt: str) -> dict[str, np.ndarray]:
    """Rows -> rows with a 48 kHz mono `wave`; undecodable rows are written to OUTPUT/_rejects/."""
    keep, waves, rejects = [], [], []
    for i in range(len(batch["id"])):
        row = {k: v[i] for k, v in batch.items()}
        if row.get("error_reason"):  # the manifest reader already knew this row is unusable
            rejects.append(reject(row, "read_manifest", str(row["error_reason"]), str(row["error_detail"])))
            continue
        try:
            waves.append(retry_transient(lambda: decode_row(row), what=str(row.get("audio_uri") or row["id"])))
            keep.append(i)
        except Exception as e:  # decode errors, MemoryError, an I/O error on one file: one reject, never the job
            rejects.append(failure_reject(row, e))
    write_batch_rejects(output, attempt, rejects)
    out = {k: v[keep] for k, v in batch.items() if k != "audio"}
    out["wave"] = np.array(waves + [None], dtype=object)[:-1]  # ragged (N_i,) arrays
    return out


def decode_row(row: dict) -> np.ndarray:
    """(N,) float32 at 48 kHz from shard FLAC bytes or a manifest audio path (at most MAX_CLIP_SECONDS)."""
    if row.get("audio") is not None:
        source = row["audio"]
    else:
        ranged = int(row["byte_offset"]) >= 0  # -1: the whole object, not a tar member
        source = audio_source({"audio_uri": str(row["audio_uri"]),
                               "byte_offset": int(row["byte_offset"]) if ranged else None,
                               "byte_size": int(row["byte_size"]) if ranged else None})
    wave, _ = decode_audio(source, mono=True, target_sr=TARGET_SR, max_seconds=MAX_CLIP_SECONDS)
    return wave[0]  # decode_audio has rejected NaN/inf and empty audio


def write_batch_rejects(output: str, attempt: str, rejects: list[Reject]) -> None:
    """One file per batch in OUTPUT/_rejects/, named by the attempt and its rows: a retried task overwrites its
    own file."""
    if rejects:
        write_rejects(embeddings.rejects_folder(output), rejects, prefix=embeddings.file_prefix(attempt))


# --- stage 2: embed (callable class on an actor pool: the model loads once per actor) ---


class EmbedBatch:
    def __init__(self, checkpoint: str, batch_size: int, text: bool, precision: str = "auto",
                 layers: bool = False, threads: int | None = None):
        import torch

        from clap_core.model.clap import ClapModel
        from clap_core.model.inference import runner
        from clap_core.model.onnx_export import OnnxTowers

        # A CPU actor's torch threads (actor_threads; None: Ray's, one per reserved CPU). Ray runs this constructor
        # and the batches on two different threads, and each thread that opens a parallel region gets an OpenMP
        # team of its own: with a second team on the node's cores, libgomp's workers stop spinning between
        # regions and sleep and wake at every op (on 2 cores a batch of 8 10-s clips took 1.17x as long: the
        # median of five alternating pairs of jobs, README). So the model loads on one thread, and only the
        # batches' thread runs parallel regions (__call__).
        self.threads = max(1, min(threads, os.cpu_count() or threads)) if threads else None
        if self.threads:
            torch.set_num_threads(1)
        folder = local_copy(checkpoint)
        self.batch_size, self.text, self.precision = batch_size, text, precision
        self.onnx = is_onnx_export(folder)
        if self.onnx:  # ONNX Runtime on this CPU actor, as many threads as torch (which computes the log-mel)
            self.model = OnnxTowers(folder, threads=self.threads or torch.get_num_threads())
            self.layers = False
            return
        # Without captions to embed, the actor neither reads nor holds the text tower (for htsat-tiny-roberta,
        # 500 MB of weights read and 750 MB of memory held with its bf16 copy).
        self.model = ClapModel.from_pretrained(folder, text_tower=text)
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        runner(self.model, precision)  # the bf16 (or int8) copy of the fast path, built while the actor starts
        self.layers = layers and hasattr(self.model.audio_encoder, "layer_features")  # speech towers only

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from clap_core.model.inference import embed_audio_layers, embed_text, embed_waveforms

        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's own setting (OpenMP's is per thread)
        waves = list(batch.pop("wave"))
        batch["duration_s"] = np.array([len(w) / TARGET_SR for w in waves])
        if self.onnx:  # windows of a long clip averaged, as embed_waveforms does for an unfused model
            batch["audio_embedding"] = self.model.embed_waveforms(waves, self.batch_size)  # (B, D)
        else:
            batch["audio_embedding"] = embed_waveforms(self.model, waves, self.batch_size,
                                                       precision=self.precision)  # (B, D)
        if self.layers:  # every tower layer pooled, flattened (B, L * H), for layer-wise probes
            feats = embed_audio_layers(self.model, waves, self.batch_size)  # (B, L, H)
            batch["audio_layers"] = feats.reshape(len(waves), -1)
            batch["audio_layer_count"] = np.full(len(waves), feats.shape[1], dtype=np.int64)
        if self.text and "caption" in batch:
            captions = [str(c or "") for c in batch["caption"]]
            batch["text_embedding"] = self.model.embed_text(captions) if self.onnx \
                else embed_text(self.model, captions, precision=self.precision)
        batch["id"] = batch["id"].astype(str)
        return batch


# --- the job ---


def actor_pool(cluster_gpus: int, gpus: float | None, concurrency: int | None, min_workers: int,
               max_workers: int | None, cpus: float = 0) -> tuple[float, int | tuple[int, int]]:
    """(GPUs per actor, Ray Data concurrency: a fixed size or a (min, max) range). An explicit --gpus
    holds even when the cluster has no GPU yet: the pending GPU actors make the autoscaler add one. CPU
    actors leave a CPU for listing, reading and decoding: on a 2-CPU Ray, 2 actors would take both CPUs
    and the job would wait forever."""
    gpus_per_actor = (1.0 if cluster_gpus else 0.0) if gpus is None else gpus
    if concurrency:
        return gpus_per_actor, concurrency
    if max_workers:
        high = max_workers
    elif gpus_per_actor:
        high = max(1, int(cluster_gpus / gpus_per_actor)) if cluster_gpus else 2
    else:
        high = max(1, min(2, int(cpus) - 1)) if cpus else 2
        if high < 2:
            print(f"clap embed: Ray has {cpus:g} CPUs: {high} embedding actor, 1 CPU left for reading and decoding "
                  "(--concurrency or --max-workers to choose)", file=sys.stderr, flush=True)
    low = min(min_workers, high)
    return gpus_per_actor, (low, high) if high > low else high


def actor_threads(cpus: float, gpus_per_actor: float, pool: int | tuple[int, int]) -> int | None:
    """Torch threads per CPU embedding actor: the cluster's CPUs shared by the most actors the pool may run
    (None for GPU actors: Ray's default). Each actor reserves 1 CPU, so Ray would give torch 1 thread and leave
    the CPUs kept for decoding idle most of the time (decoding costs ~3 ms of CPU per clip, HTS-AT + RoBERTa ~60 ms):
    on 2 CPUs that halved the job's throughput. Capped at the actor's node's cores (EmbedBatch)."""
    if gpus_per_actor or not cpus:
        return None
    most = pool[1] if isinstance(pool, tuple) else pool
    return max(1, int(cpus) // max(1, most))


def decode_cpus(gpus_per_actor: float) -> float:
    """CPUs each decode task reserves. Ray Data fuses a task stage into the actor stage after it when both
    reserve the same resources (ray-project/ray#54433): with CPU actors of 1 CPU and decode tasks of 1 CPU, every
    actor decoded its own batches, serially between model calls, while the CPU kept for decoding idled (on 2
    CPUs, 40-50 ms of every 0.5 s batch of 8 clips; the job's steady state 8-10% slower). Half a CPU keeps
    decoding in tasks of its own, two of them to a CPU (it is light, ~3-5 ms of CPU a clip, and waits on reads
    from object storage). GPU actors reserve a GPU, so they never fused; their decode tasks keep a whole CPU."""
    return 1.0 if gpus_per_actor else 0.5


def embed_dataset(checkpoint: str, input_uri: str, output: str, *, split: str | None = None, batch_size: int = 16,
                  concurrency: int | None = None, text: bool = True, precision: str = "auto",
                  layers: bool = False, min_workers: int = 1, max_workers: int | None = None,
                  gpus: float | None = None, input_rejects: list[Reject] = (), runner: str = "auto") -> dict:
    """Run the embedding job; returns a summary. `runner`: "ray", a Ray Data job (a local Ray, or the cluster
    of RAY_ADDRESS); "local", this process (pipelines.embed_local); "auto", local for a small input when no
    Ray cluster is given, else ray (embed_local.choose_runner).

    `input_rejects`: rows the caller's own reader already rejected (e.g. MELD CSV lines that are not a clip),
    stored in OUTPUT/_rejects/ with the job's own, so the output accounts for every row of the corpus."""
    checkpoint, input_uri, output = (storage.absolute(u) for u in (checkpoint, input_uri, output))
    for uri in (checkpoint, input_uri, output):
        storage.check_access(uri)  # a missing bucket or refused credentials stop here, naming the URI
    folder = local_copy(checkpoint)  # an s3:// folder: downloaded once into a cache
    try:  # a broken folder fails here in one line, not in every actor; an s3:// one is named by its URI
        if is_onnx_export(folder):
            check_onnx_job(folder, precision, layers, gpus)
            gpus = 0.0  # CPU actors even on a GPU cluster: ONNX Runtime's CPU provider
        elif is_transformers_folder(folder):  # released LAION-CLAP weights: the actors import them
            check_transformers_folder(folder)
        else:
            check_checkpoint(folder)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(folder, checkpoint)) from None
    source = open_input(input_uri, split)  # its items when read here; a shard folder or a big manifest streams
    cluster_options = bool(concurrency or max_workers or gpus or min_workers != 1)
    if source.items is not None:
        rows = len(source.items)
    elif runner != "ray" and source.shards:  # counted only when a runner may be chosen by them
        rows = shard_rows(input_uri, split)
    else:  # a manifest too big to read here: a job for Ray unless --runner local
        rows = None
    chosen = choose_runner(runner, rows, cluster_options=cluster_options)
    identity = embeddings.checkpoint_identity(folder)
    job = embeddings.job_hash(identity, input_uri, split, text, precision, layers)
    claim = embeddings.claim_output(output, job, {"uri": checkpoint, "identity": identity})
    if claim["state"] == "complete":  # this very job already finished here: its output stands, written once
        return embeddings.summary(claim)
    attempt = claim["attempt"]  # every file this run writes is named by it
    if input_rejects:
        write_rejects(embeddings.rejects_folder(output), list(input_rejects), name="input.parquet",
                      prefix=embeddings.file_prefix(attempt))
    write_batch_rejects(output, attempt, source.duplicates)
    if chosen == "local":
        why = "no Ray cluster given" if runner == "auto" else "--runner local"
        size = "rows streamed" if rows is None else f"{rows} rows"  # a big input, not counted beforehand
        print(f"clap embed: {size}, {why}: embedding in this process (--runner ray for a Ray job)",
              file=sys.stderr, flush=True)
        embed_in_process(local_rows(source), rows, output, attempt,
                         checkpoint=checkpoint, batch_size=batch_size, text=text, precision=precision,
                         layers=layers)
        return embeddings.summary(embeddings.commit(output, attempt))

    import ray
    from ray.data.datasource import FilenameProvider

    init_ray()  # a local Ray, or the cluster this job was submitted to (RAY_ADDRESS)
    resources = ray.cluster_resources()
    gpus_per_actor, pool = actor_pool(int(resources.get("GPU", 0)), gpus, concurrency, min_workers, max_workers,
                                      cpus=resources.get("CPU", 0))
    ds = ray_dataset(ray, source, num_cpus=decode_cpus(gpus_per_actor))
    ds = ds.map_batches(decode_batch, fn_kwargs={"output": output, "attempt": attempt}, batch_size=batch_size,
                        num_cpus=decode_cpus(gpus_per_actor))
    threads = actor_threads(resources.get("CPU", 0), gpus_per_actor, pool)
    sizes = {"min_size": pool[0], "max_size": pool[1]} if isinstance(pool, tuple) else {"size": pool}
    ds = ds.map_batches(EmbedBatch, fn_constructor_args=(checkpoint, batch_size, text, precision, layers, threads),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(**sizes), num_gpus=gpus_per_actor)
    fs, path = storage.resolve_fs(embeddings.data_path(output))
    names = FilenameProvider(dataset_uuid=attempt, file_format="parquet")  # <attempt>_<write uuid>_<task>.parquet
    ds.write_parquet(path, filesystem=fs, filename_provider=names)
    return embeddings.summary(embeddings.commit(output, attempt))


def check_onnx_job(folder: str, precision: str, layers: bool, gpus: float | None) -> None:
    """An ONNX export (clap_core.model.onnx_export) runs on CPU actors at the precision it was exported in, and
    holds no speech tower's layers: refuse the options it cannot honour before any actor starts."""
    check_export(folder)  # a broken or outdated export fails here in one line, not in every actor
    if precision != "auto":
        raise ConfigError(f"precision={precision} applies to checkpoints: an ONNX export runs at the precision it "
                          "was exported in (clap export --quantize); embed with the checkpoint for fp32 or bf16")
    if layers:
        raise ConfigError("layers=True needs a checkpoint with a speech tower, not an ONNX export")
    if gpus:
        raise ConfigError("an ONNX export runs on CPU actors (ONNX Runtime's CPU provider): drop --gpus, or embed "
                          "with the checkpoint on GPUs")


def embed_manifest(checkpoint: str, manifest: str, output: str, *, batch_size: int = 16,
                   concurrency: int | None = None, text: bool = True, layers: bool = False,
                   input_rejects: list[Reject] = (), runner: str = "auto") -> dict:
    return embed_dataset(checkpoint, manifest, output, batch_size=batch_size, concurrency=concurrency, text=text,
                         layers=layers, input_rejects=input_rejects, runner=runner)


def run(args: argparse.Namespace) -> int:
    plan_log("embed", args.output)  # Ray's lines go to OUTPUT/logs/clap-embed.log
    try:
        summary = embed_dataset(args.checkpoint, args.input, args.output, split=args.split,
                                batch_size=args.batch_size, concurrency=args.concurrency, text=not args.no_text,
                                precision=args.precision, min_workers=args.min_workers,
                                max_workers=args.max_workers, gpus=args.gpus, runner=args.runner)
    except embeddings.OutputConflictError as e:
        print(f"clap embed: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
