"""Shard files (clap_core.data.shards) as a Ray Dataset, for the jobs that stream them: pretrain and embed.

    ds = read_shards(shard_files(data_uri, "train"), columns=[...], include_paths=True, repeat=2)

Why not a bare `ray.data.read_parquet`: Ray Data 2.60 lists Parquet files through a pool of FooterReader
actors, 32 of them by default, started afresh for every execution of the dataset (every training epoch,
every worker's copy of the validation split). Each is a new Python process; on a 2-core machine starting 32
of them took about 30 s per execution, and each waited for a free CPU to be scheduled. One actor reads the
footers of a few thousand files concurrently (128 I/O threads), so the pool is sized by the file count.
"""
from __future__ import annotations

import os

from clap_core import storage

FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"  # read by Ray Data when a Parquet dataset is created
FILES_PER_FOOTER_ACTOR = 4096  # footers one FooterReader actor lists without being the bottleneck
MAX_FOOTER_ACTORS = 32  # Ray Data's own default, the ceiling for very large corpora


def footer_actors(files: int) -> int:
    """FooterReader actors for a read of this many files: one per FILES_PER_FOOTER_ACTOR, at least one."""
    return max(1, min(MAX_FOOTER_ACTORS, -(-files // FILES_PER_FOOTER_ACTOR)))


def read_shards(uris: list[str], columns: list[str] | None = None, include_paths: bool = False, repeat: int = 1):
    """A Ray Dataset of the rows of these shard files (all on one filesystem: a folder or one bucket), each file
    read `repeat` times (one pass over a small corpus per repeat), only `columns` when given."""
    import ray.data

    if not uris:
        raise ValueError("no shard files to read")
    fs, _ = storage.resolve_fs(uris[0])
    paths = [storage.resolve_fs(u)[1] for u in uris] * repeat
    saved = os.environ.get(FOOTER_ACTORS_ENV)
    if saved is None:  # the user's own setting wins
        os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(len(paths)))
    try:  # the indexer reads the variable when the dataset is created, here, and carries the value with it
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=include_paths)
    finally:
        if saved is None:
            os.environ.pop(FOOTER_ACTORS_ENV, None)
    return ds.select_columns(columns) if columns else ds
