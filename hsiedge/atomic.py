"""Write-then-rename: nothing half-written ever sits under a final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it becomes `path`
    (with the usual permissions), when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(tmp: str | Path) -> None:
    """Give a directory made by tempfile.mkdtemp the usual permissions before it is renamed."""
    os.chmod(tmp, 0o777 & ~_umask())


def check_writable(path: str | Path) -> None:
    """Raise OSError (with the system's reason) unless a file can be created where `path` will
    be written (its folder is made if missing): a long job checks this before it starts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    os.close(fd)
    os.unlink(probe)
