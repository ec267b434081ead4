"""How `clap pretrain` sizes its workers against the CPUs Ray has: data ingest keeps INGEST_CPUS."""
from __future__ import annotations

from clap_core.train.config import load_pretrain_config
from pipelines.pretrain import DEFAULT_CONFIG, INGEST_CPUS, worker_resources_for


def scaling(*overrides: str):
    return load_pretrain_config(DEFAULT_CONFIG, list(overrides)).scaling


def test_default_workers_share_what_ingest_leaves(capsys):
    assert INGEST_CPUS == 1.0
    assert worker_resources_for(scaling("scaling.num_workers=2"), 2.0) == {"CPU": 0.5}
    assert "each of the 2 workers gets 0.5 CPU" in capsys.readouterr().err
    assert worker_resources_for(scaling("scaling.num_workers=2"), 8.0) is None  # Ray Train's 1 CPU each
    assert capsys.readouterr().err == ""


def test_chosen_resources_are_kept_and_a_starved_ingest_is_said(capsys):
    chosen = scaling("scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}")
    assert worker_resources_for(chosen, 4.0) == {"CPU": 1}
    assert capsys.readouterr().err == ""
    assert worker_resources_for(chosen, 2.0) == {"CPU": 1}  # as chosen: an autoscaler may add CPUs
    err = capsys.readouterr().err
    assert "leave 0 of Ray's 2 CPUs for data ingest" in err and "waits for data" in err
