"""Untrusted paths: what is really there, said before anything opens it.

A FIFO named like a scene, checkpoint or key blocks `open()` forever, and a device never
ends, so every reader of user- or bundle-supplied files asks `file_kind` first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """What an `os.stat`/`os.lstat` mode is, in words: "a directory", "a FIFO (named pipe)", ..."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path after links, or a hard link to it."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_clash(outputs: dict[str, Path], inputs: dict[str, Path],
                 keep_out: Path | None = None) -> str | None:
    """One sentence when an output (what it is -> path) would replace an input (its words, as
    "the scene s.tif" -> path), lie inside `keep_out` (a bundle), or is also another output;
    None when all is well."""
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        for in_what, f in inputs.items():
            if same_file(path, f):
                return f"{path}: the {what} would overwrite {in_what}; choose another path"
        if keep_out is not None and keep_out.resolve() in path.resolve().parents:
            return f"{path}: the {what} would be written inside the bundle {keep_out}; choose another path"
        key = path.resolve()
        if key in seen:
            return f"{path}: given as both the {seen[key]} and the {what}; choose other names"
        seen[key] = what
    return None
