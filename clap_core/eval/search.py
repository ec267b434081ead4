"""Top-k search in a `clap embed` output by cosine similarity: the library side of `clap search`.

    index = load_index("emb/")                          # every embedded row (clap_core.data.embeddings)
    hits = search(model, index, "a dog barking", k=10)  # [{"rank", "score", "id", "caption", "source"}, ...]
    hits = search(model, index, "query.wav", audio=True)

The index must have been embedded by `model`'s checkpoint (`embeddings.check_checkpoint` tells): the query
and the index must share one embedding space. Embeddings are unit vectors, so a dot product is the cosine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clap_core.data import embeddings


@dataclass
class SearchIndex:
    ids: list[str]  # (N,) row ids, sorted
    captions: list[str]  # (N,) the input's caption ("" when it had none)
    sources: list[str]  # (N,) the input's audio path or URI
    audio: np.ndarray  # (N, D) float32 unit audio embeddings

    def __len__(self) -> int:
        return len(self.ids)


def load_index(output: str) -> SearchIndex:
    """Every embedded row of a finished `clap embed` output (local or s3://)."""
    table = embeddings.read_table(output)
    return SearchIndex(ids=[str(i) for i in table.column("id").to_pylist()],
                       captions=embeddings.text_column(table, "caption"),
                       sources=embeddings.text_column(table, "source_path"),
                       audio=embeddings.embedding_matrix(table, "audio_embedding"))


def search(model, index: SearchIndex, query: str, k: int = 10, audio: bool = False) -> list[dict]:
    """Top-k rows by cosine similarity to the query's embedding (a text, or an audio file with `audio`),
    best first; equal scores keep index order."""
    q = model.embed_audio(query) if audio else model.embed_text([query])  # (1, D)
    scores = index.audio @ q[0]  # (N,)
    top = np.argsort(-scores, kind="stable")[:k]
    return [{"rank": r + 1, "score": float(scores[i]), "id": index.ids[i], "caption": index.captions[i],
             "source": index.sources[i]} for r, i in enumerate(top)]
