"""clap_core.eval.search without Ray: the index read from a `clap embed` output, and top-k by cosine."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clap_core.data import embeddings
from clap_core.eval.search import SearchIndex, load_index, search, search_output


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


def write_output(folder, files: list[list[dict]]) -> str:
    """A finished `clap embed` output of these data files (rows with id, audio_embedding and metadata)."""
    claim = embeddings.claim_output(str(folder), "job", {"uri": "ckpt", "identity": "abc"})
    (folder / "data").mkdir()
    for n, rows in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{claim['attempt']}_part{n}.parquet")
    embeddings.commit(str(folder), claim["attempt"])
    return str(folder)


def test_search_output_reads_a_file_at_a_time_and_ranks_as_the_whole_index(tmp_path):
    """`clap search`'s path keeps the k best rows between files: the same hits as the index held whole for every
    k, with equal scores across files (and within one) in id order."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 3)).astype(np.float32)
    vectors[[3, 17, 25]] = vectors[[5, 5, 5]]  # equal scores in three files and one: ties at every cut
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [{"id": f"r{i:02d}", "audio_embedding": vectors[i].tolist(), "caption": f"cap {i}",
             "source_path": f"{i}.wav", "text_embedding": [0.0, 0.0, 1.0]} for i in rng.permutation(30)]
    output = write_output(tmp_path, [rows[:7], rows[7:20], rows[20:21], rows[21:]])
    index = load_index(output)
    for k in (1, 2, 3, 4, 6, 13, 29, 30, 50):
        for query, audio in (("a text", False), ("q.wav", True)):
            assert search_output(FakeModel(), output, query, k, audio) == search(FakeModel(), index, query, k, audio)
    assert len(search_output(FakeModel(), output, "x", 50)) == 30 and search_output(FakeModel(), output, "x", 0) == []
    tied = [h["id"] for h in search(FakeModel(), index, "x", 30) if h["id"] in ("r03", "r05", "r17", "r25")]
    assert tied == ["r03", "r05", "r17", "r25"]


def test_embedding_matrix_takes_every_list_layout_and_refuses_ragged_rows():
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 3)
    table = pa.table({"fixed": pa.chunked_array([fixed.slice(0, 1), fixed.slice(1)]),
                      "lists": pa.array(vectors.tolist(), type=pa.list_(pa.float64()))})
    assert np.array_equal(embeddings.embedding_matrix(table, "fixed"), vectors)
    assert embeddings.embedding_matrix(table, "lists").dtype == np.float32
    assert np.array_equal(embeddings.embedding_matrix(table, "lists"), vectors)
    assert embeddings.embedding_matrix(table.slice(0, 0), "fixed").shape[0] == 0
    for rows in ([[1.0, 2.0], [3.0], [4.0, 5.0]], [[1.0], [2.0, 3.0, 4.0]], [[1.0, 2.0], None]):
        with pytest.raises(ValueError, match="rows of different lengths"):  # [1], [2, 3, 4]: 4 values, 2 rows
            embeddings.embedding_matrix(pa.table({"e": pa.array(rows)}), "e")


def test_iter_tables_reads_the_listed_files_and_only_columns_they_have(tmp_path):
    output = write_output(tmp_path, [[{"id": "a", "audio_embedding": [1.0]}], [{"id": "b", "audio_embedding": [2.0]}]])
    (tmp_path / "data" / "stray.parquet").write_bytes(b"not even parquet")  # never listed: never read
    tables = list(embeddings.iter_tables(output, ["id", "caption", "audio_embedding"]))
    assert [t.column_names for t in tables] == [["id", "audio_embedding"]] * 2
    assert sorted(t.column("id")[0].as_py() for t in tables) == ["a", "b"]
