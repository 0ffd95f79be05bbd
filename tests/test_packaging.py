"""`pip install .` ships the mapped packages and the kernel source."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_contents(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hsiedge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("hsiedge/export/__init__.py", "hsiedge/runtimes/__init__.py", "hsiedge/cli/__init__.py",
              "hsiedge/cli/__main__.py", "hsiedge/many/worker.py",
              "hsiedge/ops/csrc/selective_scan_cpu.c", "hsiedge/models/mambahsi.py"):
        assert f in names, f"{f} missing from the wheel"


def test_mapped_packages_import():
    import hsiedge.export
    import hsiedge.runtimes

    assert Path(hsiedge.export.__file__).parent.name == "export"
    assert Path(hsiedge.runtimes.__file__).parent.name == "runtimes"
