"""Preprocessing on the workers, free of Ray: one planned row -> output rows, one unit -> shards + marker.

    rows_out, rejects = process_row(planned_row, cfg)           # any process: pure function of its inputs
    marker = process_unit(unit, cfg, out_uri, merger)           # writes shards + rejects, then its marker

The driver side: clap_core.preprocess.plan (Plan, Unit, plan_units), pipelines/preprocess.py (the job),
clap_core.data.shards (output layout, shard writer, manifest.json = the index: `build_index` /
`write_index`), clap_core.data.markers (the `_done` markers: `read_markers`, `check_markers`).

Exactly once, resumable (local folders and s3://):
1. Planning is a pure function of the input and the config (clap_core.preprocess.plan). Every input
   row gets an id (given, or its path without suffix), a split, caption checks, duplicate-id check
   (first row in input order wins) and, for speech rows, an env partner of the same split per
   augmented copy. Rows go to units by a stable hash of their id: per split, in (hash, row index)
   order, cut every `rows_per_unit` rows. So unit -> rows never depends on timing, and each unit
   carries a hash of its exact content.
2. A unit writes `<split>/part-<n>-<k>.parquet` (k rolls over at output.shard_mb) and
   `_rejects/part-<split>-<n>.parquet` with atomic commits (local: temp file + rename; S3: one PUT),
   then `_done/<split>-<n>.json` (its files, counts, hashes). The marker is the unit's commit point.
3. A re-run of the same input and config reads the committed plan back (pipelines/preprocess_plan.py),
   otherwise plans again; it refuses an output whose markers carry other unit hashes (config or input
   changed), skips units with a marker, deletes temp files and the files of units without a marker
   (a crash between a shard and its marker), and processes the rest; a redone unit produces the same
   file names and bytes because processing is deterministic (seeded per clip and copy, our own FLAC
   quantisation, fixed row order).
   A storage failure while reading a clip (clap_core.io_faults: 5xx, throttling, resets, after the
   client's retries) is never a reject: the unit raises, is retried, and if it still fails stays
   uncommitted for the re-run; a refused bucket/credential stops the job.
4. `manifest.json` (the index) is written last, from the markers only; readers use the files it lists,
   so a stray file can never add a duplicate. Ray Data's own at-least-once writes are not used.

Row accounting: every input row ends in exactly one place, as one or more output rows (the clip,
its segments, its augmented copies; `source_id` points back) or as one reject row with a stage
(read_manifest / decode / validate / augment) and a machine-readable reason.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np

from clap_core import storage
from clap_core.audio.augment import augment_clip
from clap_core.audio.codec import AudioStream, encode_flac, stream_audio
from clap_core.data.captions import build_caption_merger
from clap_core.data.input_rows import audio_source
from clap_core.data.markers import Marker, UnitRejects, write_marker
from clap_core.data.rejects import failure_reason, reject, write_rejects
from clap_core.data.shards import ShardWriter, relative, unit_files
from clap_core.io_faults import is_data_error
from clap_core.preprocess.config import PreprocessConfig
from clap_core.preprocess.plan import Unit
from clap_core.preprocess.rows import EnvPartner, PlannedRow

SEGMENT_STAGE = "segment"  # rejects of one dropped segment of a long clip, not of an input row


# -------------------------------------------------------------------------------------------------
# one row


def merger_provenance(cfg: PreprocessConfig) -> dict:
    """Which caption merger wrote a mixed copy's captions (recorded in its `augment` JSON)."""
    c = cfg.captions
    if c.merger == "seq2seq":
        return {"name": "seq2seq", "model": c.model, "prompt": c.prompt}
    return {"name": "template", "template": c.template}


def build_merger(cfg: PreprocessConfig):
    """The configured caption merger for environmental mixes."""
    c = cfg.captions
    if c.merger == "seq2seq":
        return build_caption_merger("seq2seq", model_name_or_path=c.model, prompt=c.prompt)
    return build_caption_merger("template", template=c.template)


def open_row_audio(source: dict, cfg: PreprocessConfig) -> AudioStream:
    """Open a row's audio (local path, s3:// object, or a byte range of a tar) as a bounded-block stream.

    Decoding stops at audio.max_seconds when long clips are rejected, else at audio.max_source_seconds:
    a header that declares more is rejected before any sample is decoded."""
    a = cfg.audio
    limit = a.max_seconds if a.long_clip == "reject" else a.max_source_seconds
    return stream_audio(audio_source(source), mono=a.mono, target_sr=a.target_sr, max_channels=a.max_channels,
                        max_seconds=limit)


def load_wave(source: dict, cfg: PreprocessConfig, max_samples: int | None = None) -> np.ndarray:
    """The decoded (C, N) audio of a row, or only its first max_samples (decoding stops there)."""
    parts, held = [], 0
    for block in open_row_audio(source, cfg).blocks:
        parts.append(block)
        held += block.shape[1]
        if max_samples is not None and held >= max_samples:
            break
    wave = np.concatenate(parts, axis=1)
    return wave if max_samples is None else wave[:, :max_samples]


def peak_db(wave: np.ndarray) -> float:
    peak = float(np.abs(wave).max())
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def validate_wave(wave: np.ndarray, cfg: PreprocessConfig, whole_clip: bool = True) -> tuple[str, str] | None:
    """(reason, detail) when a decoded clip (or one segment of it) must not be used, else None."""
    a = cfg.audio
    seconds = wave.shape[1] / a.target_sr
    level = peak_db(wave)
    if a.silence == "reject" and level < a.silence_threshold_db:
        return "silent", f"peak {level:.1f} dBFS < {a.silence_threshold_db} dBFS"
    if whole_clip and seconds < a.min_seconds:
        return "too_short", f"{seconds:.3f} s < min_seconds {a.min_seconds}"
    if whole_clip and seconds > a.max_seconds and a.long_clip == "reject":
        return "too_long", f"{seconds:.3f} s > max_seconds {a.max_seconds}"
    return None


def fit_full_scale(wave: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """Float sources can peak above 1.0, which FLAC storage would clip: scale the clip down to a peak of 1.0
    and record it (audio.over_full_scale=normalize), or reject it (=reject). Returns (wave, provenance)."""
    peak = float(np.abs(wave).max())
    if peak <= 1.0:
        return wave, {}
    if cfg.audio.over_full_scale == "reject":
        raise OverFullScale(f"peak {peak:.3f} > 1.0 (full scale): storing it would clip")
    return (wave / peak).astype(np.float32), {"normalized": {"source_peak": round(peak, 6), "gain": round(1 / peak, 6)}}


class OverFullScale(Exception):
    """A clip peaking above full scale with audio.over_full_scale=reject."""


def stream_segments(blocks, max_n: int):
    """Cut a block stream into segments as it decodes: (index, start sample, (C, n), whole clip?).

    A clip of at most max_n samples is one segment (the whole clip). A longer one gets max_n-sample
    segments while more than 2 * max_n samples are held, and its rest (between max_n and 2 * max_n)
    is cut in two equal halves, so no segment is shorter than max_n / 2. At most 2 * max_n samples
    plus one block are held: memory is flat in the clip's length."""
    held, index, start = [], 0, 0
    size = 0
    for block in blocks:
        held.append(block)
        size += block.shape[1]
        if size > 2 * max_n:
            wave = np.concatenate(held, axis=1)
            while wave.shape[1] > 2 * max_n:
                yield index, start, wave[:, :max_n].copy(), False
                wave, start, index = wave[:, max_n:], start + max_n, index + 1
            held, size = [wave], wave.shape[1]
    wave = np.concatenate(held, axis=1)
    n = wave.shape[1]
    if n <= max_n:
        yield index, start, wave, index == 0
        return
    half = (n + 1) // 2
    yield index, start, wave[:, :half], False
    yield index + 1, start + half, wave[:, half:], False


def output_row(row: PlannedRow, row_id: str, wave: np.ndarray, captions: list[str], augment: dict, cfg: PreprocessConfig) -> dict:
    sr = cfg.audio.target_sr
    return {"id": row_id, "audio": encode_flac(wave, sr, cfg.output.flac_subtype), "sample_rate": sr,
            "num_samples": int(wave.shape[1]), "num_channels": int(wave.shape[0]), "duration_s": wave.shape[1] / sr,
            "caption": captions[0], "captions": captions, "language": row.get("language"), "label": row.get("label"),
            "split": row["split"], "kind": row.get("kind"), "source_id": row["id"],
            "source_path": row["source_path"], "augment": json.dumps(augment, sort_keys=True)}


class EnvCache:
    """Decoded env partners of one unit (an env clip is often the partner of several speech copies)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg, self.waves = cfg, {}

    def get(self, env: EnvPartner) -> tuple[np.ndarray | None, str | None]:
        """(first max_seconds of the env wave, None) or (None, reason it cannot be used)."""
        if env["id"] not in self.waves:
            max_n = int(self.cfg.audio.max_seconds * self.cfg.audio.target_sr)
            try:
                wave = load_wave(env, self.cfg, max_samples=max_n)  # decoding stops after max_seconds
                problem = validate_wave(wave, self.cfg, whole_clip=False)
                if problem is None:
                    wave, _ = fit_full_scale(wave, self.cfg)
                self.waves[env["id"]] = (None, problem[0]) if problem else (wave, None)
            except Exception as e:  # a broken partner costs the mix, never the speech clip...
                if not is_data_error(e):
                    raise  # ...but an unreadable one (storage fault) must not change the output: retry the unit
                self.waves[env["id"]] = (None, getattr(e, "reason", type(e).__name__))
        return self.waves[env["id"]]


def augmented_rows(row: PlannedRow, seg_id: str, wave: np.ndarray, base: dict, cfg: PreprocessConfig, merger,
                   env_cache: EnvCache) -> list[dict]:
    """The cfg.augment.copies augmented copies of one clip or segment (none outside cfg.augment.splits:
    an evaluation split holds each clip once, so its retrieval metrics are not capped by near-duplicates)."""
    out = []
    copies = cfg.augment.copies if row["split"] in cfg.augment.splits else 0
    for k in range(1, copies + 1):
        partner = row["env_partners"].get(str(k))
        env_wave, skipped = env_cache.get(partner) if partner else (None, None)
        copy, applied = augment_clip(wave, seg_id, k, cfg.augment, env=env_wave,
                                     env_id=partner["id"] if partner else None)
        record = {**base, "copy": k, **applied}  # "copy" marks an augmented copy even when no effect fired
        captions = row["captions"]
        if "env_mix" in applied:
            captions = [merger(c, partner["caption"]) for c in captions]
            record["env_mix"] = {**applied["env_mix"], "caption_merger": merger_provenance(cfg)}
        elif skipped:
            record["env_mix_skipped"] = {"env_id": partner["id"], "reason": skipped}
        out.append(output_row(row, f"{seg_id}#aug{k}", copy, captions, record, cfg))
    return out


def stream_row(row: PlannedRow, cfg: PreprocessConfig, emit, merger=None, env_cache: EnvCache | None = None) -> list[dict]:
    """Process one planned row, handing each segment's output rows (the segment and its augmented copies)
    to `emit` as soon as they exist, so a long clip is never held whole; returns the row's rejects.

    Never raises on bad input. A row that emits nothing returns exactly one reject (the row's). A long
    clip that emitted segments returns one reject per dropped segment, stage "segment", id "<id>#seg<k>":
    silent_segment, over_full_scale, augment_failed, or the decode reason of a damaged tail (whose id
    is the first segment not emitted)."""
    if row.get("planned_reject"):
        p = row["planned_reject"]
        return [reject(row, p["stage"], p["reason"], p["detail"])]
    merger = merger or build_merger(cfg)
    env_cache = env_cache or EnvCache(cfg)
    sr = cfg.audio.target_sr
    emitted, dropped, next_index = 0, [], 0
    try:
        stream = open_row_audio(row, cfg)
        for index, start, seg, whole in stream_segments(stream.blocks, int(cfg.audio.max_seconds * sr)):
            next_index = index + 1
            seg_id = row["id"] if whole else f"{row['id']}#seg{index}"
            seg_row = {**row, "id": seg_id}
            problem = validate_wave(seg, cfg, whole_clip=whole)
            if problem:
                if whole:
                    return [reject(row, "validate", *problem)]
                dropped.append(reject(seg_row, SEGMENT_STAGE, f"{problem[0]}_segment", problem[1]))
                continue
            try:
                seg, level = fit_full_scale(seg, cfg)
            except OverFullScale as e:
                if whole:
                    return [reject(row, "validate", "over_full_scale", str(e))]
                dropped.append(reject(seg_row, SEGMENT_STAGE, "over_full_scale", str(e)))
                continue
            base = {**({} if whole else {"segment": {"index": index, "start_s": start / sr}}), **level}
            try:  # a segment goes out with all its copies or not at all
                rows = [output_row(row, seg_id, seg, row["captions"], base, cfg)]
                rows += augmented_rows(row, seg_id, seg, base, cfg, merger, env_cache)
            except Exception as e:
                if not is_data_error(e):
                    raise  # a storage fault (env partner read): the unit stays uncommitted and is retried
                if whole:
                    return [reject(row, "augment", "augment_failed", f"{type(e).__name__}: {e}")]
                dropped.append(reject(seg_row, SEGMENT_STAGE, "augment_failed", f"{type(e).__name__}: {e}"))
                continue
            emit(rows)
            emitted += 1
    except Exception as e:  # decode errors, MemoryError or a decoder crash on hostile bytes: never the job...
        if not is_data_error(e):
            raise  # ...but a storage failure is no verdict on the clip: the unit stays uncommitted, retried
        stage, reason, detail = failure_reason(e)
        if not emitted:
            return [reject(row, stage, reason, detail)]
        tail = {**row, "id": f"{row['id']}#seg{next_index}"}
        return dropped + [reject(tail, SEGMENT_STAGE, reason, f"the rest of the clip is lost: {detail}")]
    if not emitted:
        reasons = sorted({d["reason"] for d in dropped})
        reason = "silent" if reasons == ["silent_segment"] else "no_usable_segment"
        return [reject(row, "validate", reason, f"all {len(dropped)} segments dropped ({', '.join(reasons)})")]
    return dropped


def process_row(row: PlannedRow, cfg: PreprocessConfig, merger=None, env_cache: EnvCache | None = None) -> tuple[list[dict], list[dict]]:
    """One planned row -> (its output rows, its rejects); see stream_row (this one holds the rows: tests)."""
    out: list[dict] = []
    rejects = stream_row(row, cfg, out.extend, merger, env_cache)
    return out, rejects


# -------------------------------------------------------------------------------------------------
# one unit


def process_unit(unit: Unit, cfg: PreprocessConfig, out_uri: str, merger=None) -> Marker:
    """Process every row of a unit (unit.rows loaded), commit its shards and rejects, then its marker."""
    cpu_start = time.process_time()
    files = unit_files(out_uri, unit.split, unit.index)
    merger = merger or build_merger(cfg)
    env_cache = EnvCache(cfg)
    writer = ShardWriter(files.shard_prefix, out_uri, cfg.output.shard_mb * 1e6, cfg.output.row_group_rows)
    rejects, sources_out, seconds_in = [], 0, 0.0
    for row in unit.rows:
        emitted = {"rows": 0, "seconds": 0.0}

        def emit(rows: list[dict]) -> None:  # rows leave for the shard buffer as each segment is made
            writer.add(rows)
            emitted["rows"] += len(rows)
            emitted["seconds"] += rows[0]["duration_s"]  # the segment itself; its copies are not input time

        rejects += stream_row(row, cfg, emit, merger, env_cache)
        sources_out += emitted["rows"] > 0
        seconds_in += emitted["seconds"]
    writer.flush()
    if rejects:
        write_rejects(storage.parent(files.rejects), rejects, name=files.rejects.rsplit("/", 1)[-1])
    reasons: dict[str, int] = {}
    segment_reasons: dict[str, int] = {}  # dropped segments of long clips (their row has output)
    for r in rejects:
        counts = segment_reasons if r["stage"] == SEGMENT_STAGE else reasons
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    marker = Marker(unit=unit.key, hash=unit.hash, split=unit.split, rows_in=len(unit.rows), sources_out=sources_out,
                    rows_out=sum(s["rows"] for s in writer.shards), seconds_in=seconds_in,
                    seconds_out=sum(s["seconds"] for s in writer.shards),
                    cpu_seconds=time.process_time() - cpu_start,  # this process's CPU time: benchmarks, cost
                    shards=writer.shards,
                    rejects=UnitRejects(path=relative(out_uri, files.rejects) if rejects else None,
                                        rows=sum(reasons.values()), by_reason=reasons,
                                        segments=sum(segment_reasons.values()), segments_by_reason=segment_reasons))
    write_marker(out_uri, marker)
    return marker
