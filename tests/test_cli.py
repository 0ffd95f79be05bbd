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
