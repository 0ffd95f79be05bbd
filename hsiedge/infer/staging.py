"""Staging and journal: finished tiles on disk, so a killed run resumes to the same file.

Class ids (and probabilities) go to memory-mapped `.npy` files next to the output, with their
whole size reserved on disk before the first tile (a full disk is found at the start, never as
SIGBUS in the middle).  A journal records what defines the run (the scene's content, `--key`,
the bundle, the preprocessing, the tiling, ...) and then each finished tile, flushed tile by
tile; `--resume` continues only a run that matches in every one of them.  A lock file held
with `flock` for the whole run tells a second run on the same output that another process
(pid) is writing it, and goes away with the process, so a killed run never blocks a resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from hsiedge.infer.errors import InferError
from hsiedge.io.writer import class_dtype
from hsiedge.tiling import Tile

JOURNAL_VERSION = 2
# What a mismatch in each journal header field means to the user.
DEFINING = {
    "version": "the journal format (written by another hsiedge version)",
    "scene": "the scene path",
    "scene_sha256": "the scene's content",
    "key": "--key",
    "bundle_manifest_sha256": "the bundle",
    "preprocessing_sha256": "the preprocessing",
    "runtime": "--runtime",
    "tiling": "the tiling (--tile, --overlap, --memory)",
    "batch": "--batch",
    "probs": "--probs",
    "shape": "the scene's size",
}
# Suffixes of the temporary files the writers (`hsiedge.atomic`, `hsiedge.io.writer`) leave
# when killed mid-write: `.<name>.<random><suffix>` next to the file they were writing.
LEFTOVER_SUFFIXES = (".partial", ".partial.tif", ".partial.png", ".stage.tif")


class RunLock:
    """An exclusive `flock` on `.<output>.lock` naming the pid that holds it."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.with_name(f".{output.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InferError(f"{self.output.parent}: cannot write the output here "
                                 f"({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InferError(f"{self.output}: another hsiedge infer (pid {holder}) is writing this map "
                                 "now; wait for it to finish or choose another -o") from None
            try:  # the holder before us may have removed the file just before we locked it
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_leftovers(paths: list[Path]) -> list[Path]:
    """Delete the temporary files a killed write left next to each of `paths`; call it only
    while holding the output's `RunLock`, so no live run's temporary file is touched."""
    removed = []
    for path in paths:
        prefix = f".{path.name}."
        for p in path.parent.glob(f".{path.name}.*"):
            rest = p.name[len(prefix):]
            if p.name.startswith(prefix) and "." in rest and rest.endswith(LEFTOVER_SUFFIXES) \
                    and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _reserve(path: Path, what: str) -> None:
    """Allocate the whole file on disk now (a sparse memory map would fail later, by SIGBUS)."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        free = shutil.disk_usage(path.parent).free
        raise InferError(f"{path.parent}: not enough free disk space for the {what} staging file: it needs "
                         f"{size / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free") from None


class Staging:
    """Finished tiles on disk: class ids (and probabilities) as memory maps, plus a journal."""

    def __init__(self, output: Path, header: dict[str, Any], shape: tuple[int, int], num_classes: int,
                 probs: bool, resume: bool) -> None:
        self.classes_path = output.with_name(f".{output.name}.classes.npy")
        self.probs_path = output.with_name(f".{output.name}.probs.npy") if probs else None
        self.journal_path = output.with_name(f".{output.name}.journal")
        self.done: set[int] = set()
        header = {**header, "version": JOURNAL_VERSION}
        if self.journal_path.exists():
            if not resume:
                raise InferError(f"{self.journal_path}: an interrupted run of this output is here; pass "
                                 "--resume to continue it, or delete the file to start over")
            found = self._read_journal()
            diff = [k for k in DEFINING if found.get(k) != header.get(k)]
            if diff:
                raise InferError(f"{self.journal_path}: the interrupted run differs in "
                                 f"{'; '.join(DEFINING[k] for k in diff)}; rerun it as it was, or delete "
                                 "the journal to start over")
            mode = "r+"
            # the interrupted run's creation time, so that the resumed map is the same file
            self.created = found.get("created", header.get("created"))
        else:
            mode = "w+"
            self.created = header.get("created")
        open_map = np.lib.format.open_memmap
        try:
            self.classes = open_map(self.classes_path, mode=mode, dtype=class_dtype(num_classes), shape=shape)
            self.probs = None if not probs else open_map(self.probs_path, mode=mode, dtype=np.uint8,
                                                          shape=(num_classes, *shape))
            if mode == "w+":
                _reserve(self.classes_path, "class")
                if self.probs_path is not None:
                    _reserve(self.probs_path, "probability")
        except (OSError, ValueError) as e:
            if mode == "w+":
                self._unlink_maps()
            raise InferError(f"{self.classes_path}: cannot use the staging file ({e})") from None
        except InferError:
            self._unlink_maps()
            raise
        if mode == "w+":
            self._journal = open(self.journal_path, "w")  # noqa: SIM115 - kept open for the run
            self._append(header)
        else:
            self._journal = open(self.journal_path, "a")  # noqa: SIM115

    def _read_journal(self) -> dict[str, Any]:
        """The journal's header, and the finished tiles into `self.done`."""
        lines = self.journal_path.read_text(errors="replace").splitlines()
        try:
            found = json.loads(lines[0]) if lines else {}
        except ValueError:
            found = {}
        if not isinstance(found, dict):
            found = {}
        for line in lines[1:]:
            try:
                self.done.add(int(json.loads(line)["tile"]))
            except (ValueError, KeyError, TypeError):
                break  # a line torn by the crash: that tile runs again
        return found

    def _append(self, record: dict[str, Any]) -> None:
        self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def record(self, tile: Tile, classes: np.ndarray, probs: np.ndarray | None) -> None:
        """Store one tile's results, make them durable, then journal the tile as done."""
        rows, cols = tile.core.slices()
        self.classes[rows, cols] = classes
        self.classes.flush()
        if self.probs is not None and probs is not None:
            self.probs[:, rows, cols] = probs
            self.probs.flush()
        self._append({"tile": tile.index})

    def close(self) -> None:
        if hasattr(self, "_journal"):
            self._journal.close()

    def _unlink_maps(self) -> None:
        for p in (self.classes_path, self.probs_path):
            if p is not None:
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the staging files: only once every output is complete and verified."""
        self.close()
        self._unlink_maps()
        self.journal_path.unlink(missing_ok=True)
