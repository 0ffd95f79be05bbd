"""The run report: one JSON file per `infer-many` run, rewritten (atomically) as scenes finish.

It lists every scene with its status (done, skipped, failed, pending), pixels, seconds, px/s,
the worker, the sha256 of each output and of each scene file, and the error.  `--resume` reads
the previous report to skip the scenes it proves finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hsiedge import __version__
from hsiedge.atomic import atomic_path

REPORT_VERSION = 1
REPORT_NAME = "hsiedge-run.json"
MAX_REPORT_BYTES = 256 * 2**20


class ReportError(ValueError):
    """A previous run's report cannot be used; the message says which file and why."""


def read_report(path: Path) -> dict[str, Any] | None:
    """A previous run's report, or None when there is none."""
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise ReportError(f"{path}: expected a run report of at most {MAX_REPORT_BYTES // 2**20} MiB, "
                              f"found {path.stat().st_size / 2**20:,.0f} MiB")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if isinstance(e, ReportError):
            raise
        raise ReportError(f"{path}: cannot read the previous run's report ({e}); delete it to start "
                          "over") from None
    if not (isinstance(doc, dict) and doc.get("version") == REPORT_VERSION
            and isinstance(doc.get("scenes"), list)
            and all(isinstance(s, dict) and isinstance(s.get("scene"), str) for s in doc["scenes"])):
        raise ReportError(f"{path}: expected an hsiedge run report (version {REPORT_VERSION}), found another "
                          "JSON document; delete it or choose another --out-dir")
    return doc


def totals(scenes: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Counts per status, and the pixels classified in this run per second of wall time."""
    count = {s: sum(1 for e in scenes if e["status"] == s) for s in ("done", "skipped", "failed", "pending")}
    pixels = sum(e.get("pixels") or 0 for e in scenes if e["status"] == "done")
    return {**count, "scenes": len(scenes), "pixels_classified": pixels,
            "wall_seconds": round(wall_seconds, 3),
            "pixels_per_second": round(pixels / max(wall_seconds, 1e-9))}


class RunReport:
    """The report of the run in progress, written to `path` at most every `every` seconds (and at
    the end): a client killed mid-run leaves the scenes finished before its last write."""

    def __init__(self, path: Path, header: dict[str, Any], scenes: list[dict[str, Any]], every: float = 1.0):
        self.path = path
        self.header = {"version": REPORT_VERSION, "hsiedge": __version__, **header}
        self.scenes = {e["scene"]: e for e in scenes}
        self.every = every
        self.t0 = time.perf_counter()
        self._written = 0.0

    def started(self) -> None:
        """The cluster is ready: the time to here is the run's start-up, not its scenes'."""
        self.header["startup_seconds"] = round(time.perf_counter() - self.t0, 3)

    def record(self, entry: dict[str, Any]) -> None:
        self.scenes[entry["scene"]] = entry
        if time.perf_counter() - self._written >= self.every:
            self.write()

    def as_dict(self, finished: bool = False) -> dict[str, Any]:
        scenes = list(self.scenes.values())
        return {**self.header, "finished": finished, "totals": totals(scenes, time.perf_counter() - self.t0),
                "scenes": scenes}

    def write(self, finished: bool = False) -> dict[str, Any]:
        doc = self.as_dict(finished)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
        self._written = time.perf_counter()
        return doc
