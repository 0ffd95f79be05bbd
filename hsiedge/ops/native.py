"""Shared libraries hsiedge compiles on the user's machine (the CPU and CUDA scan kernels)."""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path


def nvcc() -> str | None:
    """The nvcc to use: `$CUDA_HOME/bin/nvcc`, else the one on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class NativeLibrary:
    """A library built on first use and loaded once per process, thread-safely.

    `path()` names the build for this machine, `build(path)` makes it (raising `error`),
    `configure(lib)` declares the C signatures.  A failure is remembered, so a machine
    without a compiler pays for it once, not at every call.
    """

    def __init__(self, path: Callable[[], Path], build: Callable[[Path], object],
                 configure: Callable[[ctypes.CDLL], None], error: type[Exception]) -> None:
        self.path, self.build, self.configure, self.error = path, build, configure, error
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._failure: str | None = None

    def load(self) -> ctypes.CDLL:
        """The loaded library; raises `error` when it cannot be built or loaded here."""
        with self._lock:
            if self._lib is not None:
                return self._lib
            if self._failure is not None:
                raise self.error(self._failure)
            try:
                path = self.path()
                if not path.exists():
                    self.build(path)
                lib = ctypes.CDLL(str(path))
            except (self.error, OSError) as e:
                self._failure = str(e)
                raise self.error(self._failure) from e
            self.configure(lib)
            self._lib = lib
            return lib
