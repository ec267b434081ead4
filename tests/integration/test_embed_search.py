"""`clap embed` (Ray Data actor pool) and `clap search` on shards written in the test."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from clap_core.config import ConfigError
from clap_core.data import embeddings
from clap_core.data.embeddings import OutputConflictError
from clap_core.eval.probe import load_embeddings
from clap_core.eval.search import load_index, search
from clap_core.eval.sources import shard_row_to_item
from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from pipelines import cli
from pipelines.embed import embed_dataset
from tests.fixtures.shards import TONES, write_shards

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    ClapModel(get_model_config("tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def embedded(ray_local, checkpoint, tmp_path_factory):
    """One embedding run over 6 good clips and 1 corrupt row, shared by the tests below."""
    root = tmp_path_factory.mktemp("embed")
    rows = write_shards(root / "shards", per_label=2, corrupt=1)
    summary = embed_dataset(str(checkpoint), str(root / "shards"), str(root / "emb"), batch_size=4, concurrency=1)
    return root, rows, summary


def read_rows(folder):
    files = [p for p in folder.rglob("*.parquet") if "_rejects" not in p.parts]
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_embed_writes_every_row_or_a_reject_and_matches_the_python_api(embedded, checkpoint):
    root, rows, summary = embedded
    out = root / "emb"
    assert summary == {"rows": 6, "rejects": 1, "reject_reasons": {"undecodable": 1}}
    written = {r["id"]: r for r in read_rows(out)}
    assert set(written) == {r["id"] for r in rows if not r["id"].startswith("corrupt")}
    model = ClapModel.from_pretrained(checkpoint)
    for row in rows[:6]:
        expected = model.embed_audio(shard_row_to_item(row).wave, sample_rate=48_000)[0]
        assert np.allclose(written[row["id"]]["audio_embedding"], expected, atol=1e-5)
        assert np.allclose(written[row["id"]]["text_embedding"], model.embed_text(row["caption"])[0], atol=1e-5)
        assert written[row["id"]]["label"] == row["label"]
    rejects = pq.read_table(next((out / "_rejects").glob("*.parquet"))).to_pylist()
    assert rejects[0]["id"] == "corrupt-0" and rejects[0]["stage"] == "decode"


def test_search_finds_the_query_clip_first(embedded, checkpoint, tmp_path):
    root, rows, _ = embedded
    index = load_index(str(root / "emb"))
    good = sorted((r for r in rows if not r["id"].startswith("corrupt")), key=lambda r: r["id"])
    assert index.ids == [r["id"] for r in good] and index.captions == [r["caption"] for r in good]
    assert index.audio.shape == (len(good), 64) and index.audio.dtype == np.float32  # tiny: embed_dim 64
    model = ClapModel.from_pretrained(checkpoint)
    query = shard_row_to_item(rows[3]).wave
    sf.write(tmp_path / "q.wav", query, 48_000, subtype="FLOAT")
    hits = search(model, index, str(tmp_path / "q.wav"), k=3, audio=True)
    assert hits[0]["id"] == rows[3]["id"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    text_hits = search(model, index, "a clip of a buzz", k=6)
    scores = index.audio @ model.embed_text(["a clip of a buzz"])[0]
    assert text_hits[0]["id"] == index.ids[int(np.argmax(scores))]


def test_embed_and_search_run_from_an_onnx_export(embedded, checkpoint, tmp_path, capsys):
    """A `clap export --format onnx` folder in place of the checkpoint: the same rows and rejects, embeddings
    equal to the fp32 model's within 1e-4, `clap search` takes the export (and refuses the checkpoint for its
    index); options an export cannot honour are refused before anything is written."""
    pytest.importorskip("onnxruntime")
    root, rows, _ = embedded
    export = tmp_path / "onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(export)]) == 0
    out = tmp_path / "emb"
    summary = embed_dataset(str(export), str(root / "shards"), str(out), batch_size=4, concurrency=1)
    assert summary == {"rows": 6, "rejects": 1, "reject_reasons": {"undecodable": 1}}
    written = {r["id"]: r for r in read_rows(out)}
    assert set(written) == {r["id"] for r in rows if not r["id"].startswith("corrupt")}
    model = ClapModel.from_pretrained(checkpoint)
    for row in rows[:6]:
        expected = model.embed_audio(shard_row_to_item(row).wave, sample_rate=48_000, precision="fp32")[0]
        assert np.abs(np.asarray(written[row["id"]]["audio_embedding"]) - expected).max() < 1e-4
        expected = model.embed_text(row["caption"], precision="fp32")[0]
        assert np.abs(np.asarray(written[row["id"]]["text_embedding"]) - expected).max() < 1e-4
    index = load_index(str(out))
    best = index.ids[int(np.argmax(index.audio @ model.embed_text(["a clip of a buzz"], precision="fp32")[0]))]
    capsys.readouterr()
    assert cli.main(["search", "a clip of a buzz", "--index", str(out), "--checkpoint", str(export), "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == best  # rank 1's id
    assert cli.main(["search", "a buzz", "--index", str(out), "--checkpoint", str(checkpoint)]) == 2
    assert "was embedded by checkpoint" in capsys.readouterr().err
    for option, words in (({"precision": "fp32"}, "precision=fp32 applies to checkpoints"),
                          ({"layers": True}, "not an ONNX export"), ({"gpus": 1.0}, "runs on CPU actors")):
        with pytest.raises(ConfigError, match=words):
            embed_dataset(str(export), str(root / "shards"), str(tmp_path / "refused"), **option)
    assert not (tmp_path / "refused").exists()


def test_rerun_of_a_finished_job_keeps_its_output(embedded, checkpoint):
    root, _, _ = embedded
    manifest = json.loads((root / "emb" / "embeddings.json").read_text())
    files = {p: p.stat().st_mtime_ns for p in (root / "emb").rglob("*.parquet")}
    again = embed_dataset(str(checkpoint), str(root / "shards"), str(root / "emb"), batch_size=8, concurrency=1)
    assert again["rows"] == 6 and len(read_rows(root / "emb")) == 6
    assert {p: p.stat().st_mtime_ns for p in (root / "emb").rglob("*.parquet")} == files  # written exactly once
    assert manifest["state"] == "complete" and sum(f["rows"] for f in manifest["files"]) == 6
    assert {root / "emb" / f["path"] for f in manifest["files"]} == {
        p for p in files if "_rejects" not in p.parts}


def test_embed_refuses_a_folder_it_did_not_write(embedded, checkpoint, tmp_path):
    root, _, _ = embedded
    before = sorted((root / "shards").rglob("*"))
    with pytest.raises(OutputConflictError, match="not a `clap embed` output.*nothing was deleted"):
        embed_dataset(str(checkpoint), str(root / "shards"), str(root / "shards"), concurrency=1)
    assert sorted((root / "shards").rglob("*")) == before  # the corpus is intact
    other = tmp_path / "other_ckpt"
    torch.manual_seed(1)
    ClapModel(get_model_config("tiny")).save_pretrained(other)
    with pytest.raises(OutputConflictError, match="another embedding job"):
        embed_dataset(str(other), str(root / "shards"), str(root / "emb"), concurrency=1)


def test_search_refuses_another_checkpoint(embedded, checkpoint, tmp_path, capsys):
    root, _, _ = embedded
    other = tmp_path / "other_ckpt"
    torch.manual_seed(1)
    ClapModel(get_model_config("tiny")).save_pretrained(other)
    assert cli.main(["search", "a buzz", "--index", str(root / "emb"), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert "was embedded by checkpoint" in err and str(checkpoint) in err
    assert cli.main(["search", "a buzz", "--index", str(root / "emb"), "--checkpoint", str(checkpoint), "-k", "2"]) == 0
    assert "rank" in capsys.readouterr().out


def test_late_files_of_a_killed_run_are_never_read(embedded, checkpoint, tmp_path, monkeypatch):
    """A killed driver's write tasks can land files after the same command, run again, has claimed OUTPUT:
    before its commit and after it. Readers see every clip once, equal to the undisturbed run; the re-run
    deletes only the killed run's files (named by its attempt), never a file it did not write."""
    root, _, summary = embedded
    output = tmp_path / "emb"

    def killed(*args, **kwargs):
        raise RuntimeError("driver killed")

    monkeypatch.setattr("pipelines.embed.init_ray", killed)  # the killed run: it claimed OUTPUT, then died
    with pytest.raises(RuntimeError, match="driver killed"):
        embed_dataset(str(checkpoint), str(root / "shards"), str(output), batch_size=4, concurrency=1)
    monkeypatch.undo()
    # what its write tasks land: the undisturbed run's files under the killed run's names (its attempt id)
    attempt = embeddings.read_index(str(output)).get("attempt")  # None: a format without attempt ids
    late = {}
    for path in (root / "emb").rglob("*.parquet"):
        name = path.name if attempt is None else embeddings.file_prefix(attempt) + path.name.split("_", 1)[1]
        late[path.parent.relative_to(root / "emb") / name] = path.read_bytes()
    assert {p.parts[0] for p in late} == {"data", "_rejects"}

    def land_late_files():
        for rel, data in late.items():
            (output / rel).parent.mkdir(parents=True, exist_ok=True)
            (output / rel).write_bytes(data)

    land_late_files()  # written before the kill: there when the re-run claims OUTPUT
    (output / "data" / "notes.parquet").write_bytes(b"not the job's")  # a file no run of the job wrote
    real_commit = embeddings.commit

    def commit_with_late_writes(*args):
        land_late_files()  # after the re-run's claim, before its index
        manifest = real_commit(*args)
        land_late_files()  # after its index
        return manifest

    monkeypatch.setattr(embeddings, "commit", commit_with_late_writes)
    assert embed_dataset(str(checkpoint), str(root / "shards"), str(output), batch_size=4, concurrency=1) == summary

    undisturbed = embeddings.read_table(str(root / "emb"))
    table = embeddings.read_table(str(output))
    assert table.column("id").to_pylist() == undisturbed.column("id").to_pylist()  # once each, sorted
    for column in ("audio_embedding", "text_embedding"):
        np.testing.assert_allclose(embeddings.embedding_matrix(table, column),
                                   embeddings.embedding_matrix(undisturbed, column), atol=1e-6, rtol=0)
    assert load_index(str(output)).ids == undisturbed.column("id").to_pylist()  # `clap search`
    probe = load_embeddings(str(output), tuple(TONES))["test"]  # the probe sweep's reader
    assert probe.ids == undisturbed.column("id").to_pylist()
    np.testing.assert_allclose(probe.audio, embeddings.embedding_matrix(undisturbed, "audio_embedding"), atol=1e-6)
    assert embeddings.summary(embeddings.read_index(str(output))) == summary  # the job summary
    assert embeddings.read_rejects(str(output)).column("id").to_pylist() == ["corrupt-0"]
    assert (output / "data" / "notes.parquet").read_bytes() == b"not the job's"  # never deleted

    embeddings.remove_output(str(output))  # the caller's own output: every attempt's files go, nothing else
    assert [p.relative_to(output) for p in output.rglob("*") if p.is_file()] == [Path("data/notes.parquet")]
