"""A restored sweep's trial logs keep one line per epoch: the last one reported (pipelines/tune_probe.py)."""
import csv
import io
import json

from pipelines.tune_probe import drop_replayed_epochs


def test_replayed_epochs_keep_their_last_report(tmp_path):
    # the killed driver logged epochs 1-2; the restored trial restarted from epoch 1's checkpoint: 2, 3 again
    reports = [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.8}, {"epoch": 2, "loss": 0.7},
               {"epoch": 3, "loss": 0.6}]
    result = tmp_path / "result.json"
    result.write_text("".join(json.dumps(r) + "\n" for r in reports))
    progress = tmp_path / "progress.csv"
    progress.write_text("epoch,loss,config/hidden\n" + "".join(f'{r["epoch"]},{r["loss"]},"[64, 32]"\n'
                                                                for r in reports))
    drop_replayed_epochs(str(result))
    drop_replayed_epochs(str(progress))
    assert [json.loads(line) for line in result.read_text().splitlines()] == [reports[0], reports[2], reports[3]]
    rows = list(csv.DictReader(io.StringIO(progress.read_text())))
    assert [(r["epoch"], r["loss"], r["config/hidden"]) for r in rows] == [
        ("1", "0.9", "[64, 32]"), ("2", "0.7", "[64, 32]"), ("3", "0.6", "[64, 32]")]


def test_a_log_without_replays_is_left_as_tune_wrote_it(tmp_path):
    result = tmp_path / "result.json"
    text = '{"epoch": 1, "x": 1.0}\n{"epoch": 2, "x": 2.0}\n'
    result.write_text(text)
    before = result.stat().st_mtime_ns
    drop_replayed_epochs(str(result))
    assert result.read_text() == text and result.stat().st_mtime_ns == before
