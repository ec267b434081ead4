"""clap_core.eval.search without Ray: the index read from a `clap embed` output, and top-k by cosine."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clap_core.data import embeddings
from clap_core.eval.search import SearchIndex, load_index, search


class FakeModel:
    """Query embeddings chosen by the test: text -> e0, audio file -> e1 (D = 3)."""

    def embed_text(self, texts):
        return np.array([[1.0, 0.0, 0.0]] * len(texts), np.float32)

    def embed_audio(self, path):
        return np.array([[0.0, 1.0, 0.0]], np.float32)


def test_search_ranks_by_cosine_and_keeps_index_order_on_ties():
    audio = np.array([[0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], np.float32)  # (N, D)
    index = SearchIndex(ids=["a", "b", "c", "d"], captions=["ca", "", "cc", "cd"], sources=["a.wav"] * 4,
                        audio=audio)
    hits = search(FakeModel(), index, "anything", k=3)
    assert [(h["rank"], h["id"]) for h in hits] == [(1, "c"), (2, "b"), (3, "d")]  # b before d: equal scores
    assert np.allclose([h["score"] for h in hits], [1.0, 0.6, 0.6])
    hits = search(FakeModel(), index, "q.wav", k=10, audio=True)
    assert [h["id"] for h in hits] == ["a", "b", "d", "c"] and hits[0]["caption"] == "ca"


def test_load_index_reads_only_the_listed_files_sorted_by_id(tmp_path):
    claim = embeddings.claim_output(str(tmp_path), "job", {"uri": "ckpt", "identity": "abc"})
    assert claim["state"] == "running"
    (tmp_path / "data").mkdir()
    rows = [{"id": i, "audio_embedding": [float(k), 1.0], "caption": None if i == "b" else f"cap {i}",
             "source_path": f"{i}.wav"} for k, i in enumerate(["c", "a", "b"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"{claim['attempt']}_part.parquet")
    embeddings.commit(str(tmp_path), claim["attempt"])
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "stray.parquet")  # not in the manifest
    index = load_index(str(tmp_path))
    assert index.ids == ["a", "b", "c"] and index.captions == ["cap a", "", "cap c"]
    assert index.sources == ["a.wav", "b.wav", "c.wav"] and len(index) == 3
    assert np.array_equal(index.audio, np.array([[1.0, 1.0], [2.0, 1.0], [0.0, 1.0]], np.float32))
