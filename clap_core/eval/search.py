"""Top-k search in a `clap embed` output by cosine similarity: the library side of `clap search`.

    index = load_index("emb/")                          # every embedded row (clap_core.data.embeddings)
    hits = search(model, index, "a dog barking", k=10)  # [{"rank", "score", "id", "caption", "source"}, ...]
    hits = search(model, index, "query.wav", audio=True)
    hits = search_output(model, "emb/", "a dog barking")  # one data file at a time: any size of output

`load_index` holds the whole index (N x D float32: 2 GB for a million 512-d rows) for many queries in one
process; `search_output` (what `clap search` runs) reads the output one data file at a time and keeps the k
best rows, so its memory is one file's, whatever the output's size. Both rank the same: by score, equal scores
in id order. The index must have been embedded by `model`'s checkpoint (`embeddings.check_checkpoint` tells):
the query and the index must share one embedding space. Embeddings are unit vectors, so a dot product is the
cosine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clap_core.data import embeddings

COLUMNS = ["id", "caption", "source_path", "audio_embedding"]  # what a search reads of an output


@dataclass
class SearchIndex:
    ids: list[str]  # (N,) row ids, sorted
    captions: list[str]  # (N,) the input's caption ("" when it had none)
    sources: list[str]  # (N,) the input's audio path or URI
    audio: np.ndarray  # (N, D) float32 unit audio embeddings

    def __len__(self) -> int:
        return len(self.ids)


def load_index(output: str) -> SearchIndex:
    """Every embedded row of a finished `clap embed` output (local or s3://), sorted by id: the columns a search
    needs, read a file at a time and sorted as numpy arrays (sorting the Arrow table copied its embeddings twice
    more: 8.9 GB held at a million 512-d rows)."""
    parts = [index_of(table) for table in embeddings.iter_tables(output, COLUMNS)]
    if not parts:
        raise FileNotFoundError(f"{output}: the embedding output holds no rows")
    ids = [i for part in parts for i in part.ids]
    order = sorted(range(len(ids)), key=ids.__getitem__)  # code point order = the UTF-8 byte order Arrow sorts by
    captions = [c for part in parts for c in part.captions]
    sources = [s for part in parts for s in part.sources]
    audio = np.concatenate([part.audio for part in parts])
    del parts
    return SearchIndex(ids=[ids[i] for i in order], captions=[captions[i] for i in order],
                       sources=[sources[i] for i in order], audio=audio[order])


def index_of(table) -> SearchIndex:
    return SearchIndex(ids=[str(i) for i in table.column("id").to_pylist()],
                       captions=embeddings.text_column(table, "caption"),
                       sources=embeddings.text_column(table, "source_path"),
                       audio=embeddings.embedding_matrix(table, "audio_embedding"))


def query_vector(model, query: str, audio: bool) -> np.ndarray:
    """(D,) the query's unit embedding: a text, or an audio file with `audio`."""
    return (model.embed_audio(query) if audio else model.embed_text([query]))[0]


def search(model, index: SearchIndex, query: str, k: int = 10, audio: bool = False) -> list[dict]:
    """Top-k rows by cosine similarity to the query's embedding (a text, or an audio file with `audio`),
    best first; equal scores keep index order."""
    scores = index.audio @ query_vector(model, query, audio)  # (N,)
    top = np.argsort(-scores, kind="stable")[:k]
    return hits([(float(scores[i]), index.ids[i], index.captions[i], index.sources[i]) for i in top])


def search_output(model, output: str, query: str, k: int = 10, audio: bool = False) -> list[dict]:
    """search() over a finished output read one data file at a time: the k best rows seen so far are all it
    keeps between files."""
    if k < 1:
        return []
    q = query_vector(model, query, audio)
    best: list[tuple[float, str, str, str]] = []  # (score, id, caption, source), at most k after each file
    for table in embeddings.iter_tables(output, COLUMNS):
        scores = embeddings.embedding_matrix(table, "audio_embedding") @ q  # (n,)
        if k < len(scores):  # this file's candidates: every row scoring at least its k-th best (ties kept)
            rows = np.flatnonzero(scores >= np.partition(scores, len(scores) - k)[len(scores) - k])
        else:
            rows = np.arange(len(scores))
        part = index_of(table.take(rows))
        best += [(float(s), i, c, src) for s, i, c, src in zip(scores[rows], part.ids, part.captions, part.sources)]
        best = sorted(best, key=lambda hit: (-hit[0], hit[1]))[:k]  # by score, equal scores in id order
    return hits(best)


def hits(ranked: list[tuple[float, str, str, str]]) -> list[dict]:
    return [{"rank": r + 1, "score": score, "id": row_id, "caption": caption, "source": source}
            for r, (score, row_id, caption, source) in enumerate(ranked)]
