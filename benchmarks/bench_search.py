"""`clap search` on a big index: the top-k of a query over a `clap embed` output of N rows.

    python benchmarks/bench_search.py --rows 200000
    python benchmarks/bench_search.py --rows 2000000 --no-baseline

The output is made up (random unit vectors of --dim, ids, captions, paths) in data files of 4096 rows, the size
the in-process runner writes, and committed through clap_core.data.embeddings as a job would. Each reader runs in a
child process, so its peak RSS (VmHWM) is its own:

    streamed   search_output: one data file at a time, the k best rows kept between files (what `clap search` runs)
    in memory  load_index + search: the index held whole (the Python API for many queries in one process)
    baseline   the index read as before (every column, the embeddings through Python lists) and a full argsort

All three must return the same hits (checked).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import child_process
import numpy as np
from child_process import vm_hwm_mb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class QueryModel:
    """The query's embedding, fixed by the benchmark (no model load in the timing)."""

    def __init__(self, dim: int):
        self.q = np.random.default_rng(1).normal(size=(1, dim)).astype(np.float32)
        self.q /= np.linalg.norm(self.q)

    def embed_text(self, texts):
        return np.repeat(self.q, len(texts), axis=0)


def write_output(folder: Path, rows: int, dim: int, per_file: int = 4096) -> None:
    from clap_core.data import embeddings

    claim = embeddings.claim_output(str(folder), "bench", {"uri": "ckpt", "identity": "bench"})
    rng = np.random.default_rng(0)
    for n, start in enumerate(range(0, rows, per_file)):
        count = min(per_file, rows - start)
        vectors = rng.normal(size=(count, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.array([f"clip-{i:09d}" for i in range(start, start + count)], dtype=object)
        batch = {"id": ids, "audio_embedding": vectors, "text_embedding": vectors,
                 "caption": np.array([f"caption of {i}" for i in ids], dtype=object),
                 "source_path": np.array([f"s3://bucket/audio/{i}.flac" for i in ids], dtype=object)}
        embeddings.write_data_file(str(folder), claim["attempt"], f"part_{n:06d}", [batch])
    embeddings.commit(str(folder), claim["attempt"])


def child(kind: str, output: str, dim: int, k: int) -> dict:
    import pyarrow as pa

    from clap_core.data import embeddings
    from clap_core.eval.search import SearchIndex, load_index, search, search_output

    model = QueryModel(dim)
    start = time.perf_counter()
    if kind == "streamed":
        hits = search_output(model, output, "query", k)
    elif kind == "in memory":
        hits = search(model, load_index(output), "query", k)
    else:  # as before: every column, the matrix through to_pylist
        table = embeddings.read_table(output)
        index = SearchIndex(ids=[str(i) for i in table.column("id").to_pylist()],
                            captions=embeddings.text_column(table, "caption"),
                            sources=embeddings.text_column(table, "source_path"),
                            audio=np.asarray(table.column("audio_embedding").to_pylist(), dtype=np.float32))
        del table
        hits = search(model, index, "query", k)
    assert pa  # the child imports what the readers import
    return {"seconds": time.perf_counter() - start, "peak_mb": vm_hwm_mb(), "hits": hits}


def run_child(kind: str, output: str, dim: int, k: int) -> dict:
    return child_process.run_child(__file__, kind, output, str(dim), str(k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--no-baseline", action="store_true", help="skip the old reader (it needs ~20 GB per M rows)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, output, dim, k = args.child
        print(json.dumps(child(kind, output, int(dim), int(k))))
        return
    with tempfile.TemporaryDirectory(prefix="bench_search_") as work:  # outside the checkout
        t = time.perf_counter()
        write_output(Path(work) / "emb", args.rows, args.dim)
        size = sum(f.stat().st_size for f in (Path(work) / "emb" / "data").iterdir()) / 1e6
        print(f"{args.rows:,} rows of {args.dim}-d audio and text embeddings ({size:.0f} MB in "
              f"{len(list((Path(work) / 'emb' / 'data').iterdir()))} files) written in {time.perf_counter() - t:.0f} s")
        kinds = ["streamed", "in memory"] + ([] if args.no_baseline else ["baseline"])
        runs = {kind: run_child(kind, str(Path(work) / "emb"), args.dim, args.k) for kind in kinds}
        assert all(r["hits"] == runs["streamed"]["hits"] for r in runs.values()), "the readers disagree"
        print("| rows | reader | seconds | peak RSS (MB) |")
        print("|---:|---|---:|---:|")
        for kind, r in runs.items():
            print(f"| {args.rows:,} | {kind} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
