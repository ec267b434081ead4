"""`clap search`: the top-k clips of an embedding index for a text query or an audio file.

    clap search "a dog barking in the rain" --index embeddings/ --checkpoint runs/a/final -k 10
    clap search --audio query.wav --index s3://bucket/emb --checkpoint runs/a/final

The index is the output of `clap embed` (local or s3://, format in clap_core.data.embeddings); it must have been
built by --checkpoint (its identity is recorded there): the checkpoint, or the ONNX export, that `clap embed` ran.
Scores are cosine similarities (clap_core.eval.search); the index is read one data file at a time, so an
output of any size is searched in the memory of one file.
"""
from __future__ import annotations

import argparse
import sys

from clap_core.data import embeddings
from clap_core.eval.search import search_output
from clap_core.storage import local_copy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="a text query, or an audio file with --audio")
    parser.add_argument("--index", required=True, help="`clap embed` output folder (local or s3://)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint (or ONNX export) that built the index")
    parser.add_argument("-k", type=int, default=10, help="number of results")
    parser.add_argument("--audio", action="store_true", help="the query is an audio file (audio-to-audio search)")


def run(args: argparse.Namespace) -> int:
    from clap_core.model.onnx_export import load_embedder

    folder = local_copy(args.checkpoint)
    try:  # an index searched with another checkpoint's query embeddings returns confident nonsense
        embeddings.check_checkpoint(args.index, embeddings.checkpoint_identity(folder), args.checkpoint)
    except (embeddings.CheckpointMismatchError, FileNotFoundError) as e:
        print(f"clap search: {e}", file=sys.stderr)
        return 2
    model = load_embedder(folder)  # ClapModel, or OnnxTowers for an ONNX export: both embed text and audio
    results = search_output(model, args.index, args.query, args.k, args.audio)  # one data file at a time
    print(f"{'rank':>4}  {'score':>6}  {'id':<24} caption")
    for r in results:
        print(f"{r['rank']:>4}  {r['score']:6.3f}  {r['id']:<24} {r['caption'] or r['source']}")
    return 0
