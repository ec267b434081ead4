"""`clap demo` without the `demo` extra: --storage auto falls back to the output folder, --storage s3 stops
with the install line before writing anything. moto is hidden by a None entry in sys.modules (import fails)."""
import sys

import pytest

from pipelines import demo
from pipelines.cli import main


@pytest.fixture
def no_moto(monkeypatch):
    monkeypatch.setitem(sys.modules, "moto.server", None)  # `import moto.server` raises ImportError


def test_storage_follows_the_installed_extra(capsys):
    assert demo.local_s3_available()  # the dev extra installs the demo extra
    assert demo.choose_storage("auto") == "s3" and demo.choose_storage("s3") == "s3"
    assert demo.choose_storage("local") == "local"
    assert capsys.readouterr().err == ""


def test_auto_falls_back_to_the_output_folder_and_says_so(no_moto, capsys):
    assert not demo.local_s3_available()
    assert demo.choose_storage("auto") == "local"
    assert "pip install 'clap-at-scale[demo]'" in capsys.readouterr().err
    assert demo.choose_storage("local") == "local"


def test_s3_without_the_extra_stops_with_the_install_line_and_writes_nothing(no_moto, tmp_path, capsys):
    out = tmp_path / "demo_output"
    assert main(["demo", "--storage", "s3", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'clap-at-scale[demo]'" in err and "--storage local" in err
    assert not out.exists()
