"""Shard files (clap_core.data.shards) as a Ray Dataset, for the jobs that stream them: pretrain and embed.

    ds = read_shards(shard_files(data_uri, "train"), columns=[...], include_paths=True, repeat=2)

Why not a bare `ray.data.read_parquet`: Ray Data 2.60's default Parquet reader (datasource V2) lists the files
again at every execution of the dataset (every training epoch, every worker's copy of the validation split)
through a pool of FooterReader actors, 32 new Python processes by default: on a 2-core machine that took
6-30 s per execution, each actor waiting for a free CPU to be scheduled. It also reads a path given twice
once. The V1 reader used here reads the footers once, when the dataset is created (on the driver, or in
parallel tasks for many files), then each execution only runs its read tasks (0.3 s for the same read), and
it reads a repeated path as often as it is given, which is how a small corpus fills an epoch (`repeat`).
"""
from __future__ import annotations

from clap_core import storage


def read_shards(uris: list[str], columns: list[str] | None = None, include_paths: bool = False, repeat: int = 1):
    """A Ray Dataset of the rows of these shard files (all on one filesystem: a folder or one bucket), each file
    read `repeat` times (one pass over a small corpus per repeat), only `columns` when given."""
    import ray.data

    if not uris:
        raise ValueError("no shard files to read")
    fs, _ = storage.resolve_fs(uris[0])
    paths = [storage.resolve_fs(u)[1] for u in uris] * repeat
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    # the reader is chosen when the dataset is created, here; the footer sampling it does then would draw a
    # "Parquet dataset sampling" bar of its own on the console (the job's bars stay as configured)
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, False
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=include_paths)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved
    return ds.select_columns(columns) if columns else ds
