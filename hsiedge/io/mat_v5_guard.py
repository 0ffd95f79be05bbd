"""A guard for scipy's MATLAB v5 reader, which crashes the process on some damaged files.

scipy looks data element types up in a table without a range check, recurses once per
nesting level, and allocates the counts a header states.  `v5_crash` walks a file's elements
as scipy's reader would (`_V5Walk`), building nothing, and says why scipy would crash or
exhaust memory on them, so the reader refuses such a file in one sentence.  Hand-written
because no maintained library validates v5 files; it checks structure only, never decodes data.
"""

from __future__ import annotations

import math
import struct
import zlib

# v5 data element types scipy's reader has a NumPy type for.  It looks the type of a numeric
# or text element up in a table without a range check: any other value crashes the process.
_MI_KNOWN = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 18})
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 1, 5, 6, 14, 15, 16
_MX_CELL, _MX_STRUCT, _MX_OBJECT, _MX_CHAR, _MX_SPARSE, _MX_FUNCTION, _MX_OPAQUE = 1, 2, 3, 4, 5, 16, 17
_MAX_DEPTH = 64  # arrays in cells in structs...: scipy recurses in C once per level


class _ScipyError(Exception):
    """scipy's reader stops here with a Python error, which `_loadmat` words: the walk can end."""


class _DamageError(Exception):
    """scipy's reader would crash the process or exhaust its memory here; the text says why."""


class _V5Walk:
    """Follows scipy's v5 reader (`scipy.io.matlab._mio5_utils.VarReader5`) element by element
    over one variable's bytes, building nothing, to find an element it would crash on, or an
    array count it would allocate although the file cannot hold that many."""

    def __init__(self, buf, order: str, pos: int = 0) -> None:
        self.buf, self.order, self.pos = buf, order, pos

    def u4(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise _ScipyError  # the file ends: scipy cannot read on
        (value,) = struct.unpack_from(self.order + "I", self.buf, self.pos)
        self.pos += 4
        return value

    def element(self) -> tuple[int, int, int]:
        """(type, start, byte count) of the next data element, passed over as scipy does."""
        mdtype, count = self.u4(), self.u4()
        if mdtype >> 16:  # small element: byte count and type share a word, the data is the next
            if mdtype >> 16 > 4:
                raise _ScipyError
            return mdtype & 0xFFFF, self.pos - 4, mdtype >> 16
        start, self.pos = self.pos, self.pos + count + (-count % 8)
        if start + count > len(self.buf):
            raise _ScipyError
        return mdtype, start, count

    def numbers(self, allow_empty_unknown: bool = False) -> None:
        """A numeric (or text) element: the one scipy looks up in its type table."""
        mdtype, _, count = self.element()
        if mdtype not in _MI_KNOWN and not (allow_empty_unknown and count == 0):
            raise _DamageError(f"a data element has the unknown type {mdtype}")

    def int32s(self, most: int) -> list[int]:
        mdtype, start, count = self.element()
        if mdtype not in (_MI_INT32, _MI_UINT32) or count > most:
            raise _ScipyError
        return list(struct.unpack_from(f"{self.order}{count // 4}i", self.buf, start))

    def text(self) -> int:
        """An int8 string (a name); its byte count."""
        mdtype, _, count = self.element()
        if mdtype not in (_MI_INT8, _MI_UTF8):
            raise _ScipyError
        return count

    def room_for(self, count: int, size: int, what: str) -> None:
        """scipy allocates `count` items before reading them: refuse more than the rest holds."""
        if count * size > len(self.buf) - self.pos:
            raise _DamageError(f"{what} claims {count} items, more than the file holds")

    def matrix(self, depth: int) -> None:
        """A nested array (scipy's read_mi_matrix)."""
        mdtype, count = self.u4(), self.u4()
        if mdtype != _MI_MATRIX:
            raise _ScipyError
        if count:
            self.array(depth)

    def array(self, depth: int) -> None:
        """An array's header and contents (scipy's read_header and array_from_header)."""
        if depth > _MAX_DEPTH:
            raise _DamageError(f"its arrays are nested more than {_MAX_DEPTH} deep")
        self.pos += 8  # the array flags' tag, which scipy skips unread
        flags, _ = self.u4(), self.u4()
        mclass, parts = flags & 0xFF, 2 if flags >> 11 & 1 else 1
        if mclass == _MX_OPAQUE:
            for _ in range(3):
                self.text()
            self.matrix(depth + 1)
            return
        dims = self.int32s(128)
        if min(dims, default=0) < 0:
            raise _ScipyError
        self.text()  # the name
        if 6 <= mclass <= 15:  # double ... uint64
            for _ in range(parts):
                self.numbers()
        elif mclass == _MX_SPARSE:
            for _ in range(2 + parts):
                self.numbers()
        elif mclass == _MX_CHAR:
            if not dims:  # scipy indexes the last dimension without a check
                raise _DamageError("a text array has no dimensions")
            self.room_for(math.prod(dims), 1, "a text array")  # blanks when the data is empty
            self.numbers(allow_empty_unknown=True)
        elif mclass == _MX_CELL:
            self.room_for(math.prod(dims), 8, "a cell array")  # each cell is at least a tag
            for _ in range(math.prod(dims)):
                self.matrix(depth + 1)
        elif mclass in (_MX_STRUCT, _MX_OBJECT):
            if mclass == _MX_OBJECT:
                self.text()  # the class name
            name_length = self.int32s(4)
            if len(name_length) != 1 or name_length[0] == 0:
                raise _ScipyError
            n_fields = max(self.text() // name_length[0], 0)
            self.room_for(math.prod(dims) * max(n_fields, 1), 8, "a struct array")
            for _ in range(math.prod(dims) * n_fields):
                self.matrix(depth + 1)
        elif mclass == _MX_FUNCTION:
            self.matrix(depth + 1)


def v5_crash(buf) -> str | None:
    """Why scipy's v5 reader would crash the process on the bytes of a `.mat` file, or None
    (also when it would stop with an ordinary error, or the file is not v5)."""
    if len(buf) < 128 or 0 in buf[:4]:
        return None  # cut short, or a v4 file (read in Python)
    order = "<" if buf[126:128] == b"IM" else ">"
    pos = 128
    try:
        while pos + 8 <= len(buf):  # the variables, as scipy's get_variables reads them
            mdtype, count = struct.unpack_from(order + "II", buf, pos)
            if count == 0:
                return None
            walk = _V5Walk(buf, order, pos + 8)
            if mdtype == _MI_COMPRESSED:
                try:
                    walk = _V5Walk(zlib.decompressobj().decompress(buf[pos + 8:pos + 8 + count]), order)
                except zlib.error:
                    return "its compressed data is damaged"
                mdtype, _ = walk.u4(), walk.u4()
            if mdtype != _MI_MATRIX:
                return None
            walk.array(0)
            pos += 8 + count
    except _ScipyError:
        return None
    except _DamageError as e:
        return str(e)
    return None
