"""`clap search`: the top-k clips of an embedding index for a text query or an audio file.

    clap search "a dog barking in the rain" --index embeddings/ --checkpoint runs/a/final -k 10
    clap search --audio query.wav --index s3://bucket/emb --checkpoint runs/a/final

The index is the output of `clap embed` (local or s3://, format in clap_core.data.embeddings); it must have been
built by --checkpoint (its identity is recorded there). Scores are cosine similarities.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from clap_core.data import embeddings
from clap_core.storage import local_copy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="a text query, or an audio file with --audio")
    parser.add_argument("--index", required=True, help="`clap embed` output folder (local or s3://)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint that built the index")
    parser.add_argument("-k", type=int, default=10, help="number of results")
    parser.add_argument("--audio", action="store_true", help="the query is an audio file (audio-to-audio search)")


def load_index(index: str) -> dict[str, np.ndarray]:
    """id, caption, source path and the (N, D) audio embeddings of every row of a `clap embed` output."""
    table = embeddings.read_table(index)
    cols = set(table.column_names)
    blank = [""] * table.num_rows
    return {"id": np.array(table.column("id").to_pylist()),
            "caption": np.array(table.column("caption").to_pylist() if "caption" in cols else blank, dtype=object),
            "source": np.array(table.column("source_path").to_pylist() if "source_path" in cols else blank,
                               dtype=object),
            "emb": embeddings.embedding_matrix(table, "audio_embedding")}


def search(model, index: dict[str, np.ndarray], query: str, k: int = 10, audio: bool = False) -> list[dict]:
    """Top-k rows by cosine similarity to the query's embedding, best first."""
    q = model.embed_audio(query) if audio else model.embed_text([query])  # (1, D)
    scores = index["emb"] @ q[0]  # (N,)
    top = np.argsort(-scores, kind="stable")[:k]
    return [{"rank": r + 1, "score": float(scores[i]), "id": str(index["id"][i]), "caption": index["caption"][i],
             "source": index["source"][i]} for r, i in enumerate(top)]


def run(args: argparse.Namespace) -> int:
    from clap_core.model.clap import ClapModel

    folder = local_copy(args.checkpoint)
    try:  # an index searched with another checkpoint's query embeddings returns confident nonsense
        embeddings.check_checkpoint(args.index, embeddings.checkpoint_identity(folder), args.checkpoint)
    except (embeddings.CheckpointMismatchError, FileNotFoundError) as e:
        print(f"clap search: {e}", file=sys.stderr)
        return 2
    model = ClapModel.from_pretrained(folder)
    results = search(model, load_index(args.index), args.query, args.k, args.audio)
    print(f"{'rank':>4}  {'score':>6}  {'id':<24} caption")
    for r in results:
        print(f"{r['rank']:>4}  {r['score']:6.3f}  {r['id']:<24} {r['caption'] or r['source']}")
    return 0
