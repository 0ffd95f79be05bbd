"""The installed `hsiedge` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from hsiedge import __version__
from hsiedge.cli import app


def test_version_and_help():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and "models" in r.output


def test_models_json_lists_the_three_with_counts():
    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert set(rows) == {"mambahsi", "spectralmamba", "md2f-mamba"}
    assert rows["mambahsi"]["parameters"] == 412_239


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "hsiedge"  # installed next to the interpreter
    assert exe.is_file(), f"no hsiedge console script at {exe} (package not installed?)"
    out = subprocess.run([str(exe), "models"], capture_output=True, text=True, check=True).stdout
    assert "mambahsi" in out and "412,239" in out


def test_train_model_options_are_checked_before_any_work(tmp_path):
    """`--option KEY=VALUE` reaches the model's constructor; bad ones are one sentence, exit 2."""
    from hsiedge.models.registry import parse_model_options

    assert parse_model_options("md2f-mamba", ["pooling=centre-weighted", "d_state=8"]) == {
        "pooling": "centre-weighted", "d_state": 8}
    runner = CliRunner()
    scene = tmp_path / "missing.tif"  # never read: the options fail first
    for option, message in [("nope=1", "md2f-mamba has no option 'nope'; it takes patch_size, hidden_dim"),
                            ("d_state=eight", "md2f-mamba option d_state takes an integer, got 'eight'"),
                            ("in_channels=3", "has no option 'in_channels'"),
                            ("pooling", "model option 'pooling' is not KEY=VALUE")]:
        r = runner.invoke(app, ["train", "md2f-mamba", "--scene", str(scene), "--labels", str(scene),
                                "-o", str(tmp_path / "m.pt"), "--option", option])
        assert r.exit_code != 0 and message in r.output, (option, r.output)
        assert "Traceback" not in r.output and not (tmp_path / "m.pt").exists()
