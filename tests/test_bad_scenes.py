"""Bad input to the scene and label readers: every fault is a SceneReadError with one sentence
that names the file; nothing else (a library traceback, a wrong picture, a hang, a crash).

Property tests generate the faults: ENVI headers that disagree with their data file, cut and
bit-flipped MATLAB v5 and v7.3 files, `.npy` files of every dtype and shape.  Each case either
reads back exactly what an independent decoding of the bytes gives, or is refused in one line."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
import scipy.io as sio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsiedge.io import SceneReadError, Window, open_scene, read_cube, read_labels

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ENVI data type codes GDAL reads, as NumPy types; 6 and 9 are complex.
ENVI_TYPES = {1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 12: "u2", 13: "u4", 14: "i8", 15: "u8",
              6: "c8", 9: "c16"}
INTERLEAVE_AXES = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}  # (rows, cols, bands) -> file


def refusal(fn, *args, names: Path, **kw) -> str:
    """Call fn, expect a SceneReadError of one line and one sentence naming the file (`names`
    without its suffix, so that an ENVI header's or data file's name both count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SceneReadError) as e:
            fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert re.search(r"\.\s+[A-Z]", msg) is None, f"more than one sentence: {msg}"
    assert str(names.with_suffix("")) in msg, f"the message does not name {names}: {msg}"
    return msg


def read_or_refuse(path: Path, **kw) -> np.ndarray | None:
    """The whole scene, or None after checking the refusal's message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_scene(path, **kw) as s:
                cube = s.read()
                if min(s.shape[:2]) > 1:
                    np.testing.assert_array_equal(s.read(Window(1, 0, s.height - 1, 1)), cube[1:, :1])
                return cube
    except SceneReadError:
        refusal(read_cube, path, names=path, **kw)
        return None


def labels_or_refuse(path: Path, **kw) -> np.ndarray | None:
    """The label map, or None after checking the refusal's message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read_labels(path, **kw).labels
    except SceneReadError:
        refusal(read_labels, path, names=path, **kw)
        return None


# -------------------------------------------------------------------------------------------- ENVI

def _header_value(true: int, wrong: list[str]):
    return st.one_of(st.just(str(true)), st.sampled_from(wrong), st.integers(0, 9).map(str))


@st.composite
def envi_cases(draw):
    """A cube written as ENVI, and a header whose fields may each disagree with it."""
    rows, cols, bands = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    code = draw(st.sampled_from(sorted(ENVI_TYPES)))
    interleave, order, offset = draw(st.sampled_from(list(INTERLEAVE_AXES))), draw(st.sampled_from("<>")), \
        draw(st.sampled_from([0, 0, 8, 13]))
    extra = draw(st.sampled_from([0, 0, 0, -1, 1, 7]))  # bytes cut from or added to the data file
    bad = ["-1", "-100", "abc", "1e3", "2.5", "", "+3", "0x10"]
    other_types = [*map(str, ENVI_TYPES), "0", "7", "99", "-4", "x"]
    fields = {
        "samples": draw(_header_value(cols, bad)),
        "lines": draw(_header_value(rows, bad)),
        "bands": draw(_header_value(bands, bad)),
        "data type": draw(st.one_of(st.just(str(code)), st.sampled_from(other_types))),
        "header offset": draw(st.one_of(st.just(str(offset)), st.sampled_from(["-8", "x", "4.0", "0", "8"]))),
        "byte order": draw(st.one_of(st.just(str(int(order == ">"))), st.sampled_from([None, "2", "-1"]))),
        "interleave": draw(st.one_of(st.just(interleave), st.sampled_from([*INTERLEAVE_AXES, "zigzag"]))),
    }
    values = np.arange(rows * cols * bands) % 97  # small values: every real type holds them exactly
    cube = values.reshape(rows, cols, bands).astype(ENVI_TYPES[code])
    data = np.ascontiguousarray(cube.transpose(INTERLEAVE_AXES[interleave])).astype(order + ENVI_TYPES[code])
    raw = bytes(offset) + data.tobytes()
    raw = raw[:len(raw) + extra] if extra < 0 else raw + bytes(extra)
    return fields, raw


def decode_envi(fields: dict[str, str | None], raw: bytes) -> np.ndarray | None:
    """What the header says the data file holds, decoded with NumPy alone; None when the header
    is invalid or disagrees with the data file's size (the reader must refuse those)."""
    def whole(key: str, least: int) -> int | None:
        value = fields[key]
        return int(value) if value is not None and re.fullmatch(r"[0-9]+", value) and int(value) >= least \
            else None

    cols, rows, bands = whole("samples", 1), whole("lines", 1), whole("bands", 1)
    offset, code, order = whole("header offset", 0), whole("data type", 1), fields["byte order"]
    if None in (cols, rows, bands, offset) or order not in (None, "0", "1") \
            or fields["interleave"] not in INTERLEAVE_AXES or ENVI_TYPES.get(code, "c").startswith("c"):
        return None
    dtype = np.dtype((">" if order == "1" else "<") + ENVI_TYPES[code])
    if len(raw) != offset + rows * cols * bands * dtype.itemsize or len(raw) < 2:
        return None  # GDAL cannot identify a data file of one byte (a 1 x 1 x 1 byte scene)
    axes = INTERLEAVE_AXES[fields["interleave"]]
    stored = np.frombuffer(raw, dtype, offset=offset).reshape([(rows, cols, bands)[a] for a in axes])
    return stored.transpose(np.argsort(axes))


def write_envi(folder: Path, fields: dict[str, str | None], raw: bytes, data_name: str = "s.img") -> Path:
    (folder / data_name).write_bytes(raw)
    text = "ENVI\n" + "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)
    header = folder / "s.hdr"
    header.write_text(text)
    return header


@SETTINGS
@given(case=envi_cases())
def test_envi_header_against_its_data_file(tmp_path_factory, case):
    """Any header: either it is valid and the data file has exactly the size it gives, and the
    cube reads back as NumPy decodes the bytes; or the reader refuses it in one sentence."""
    fields, raw = case
    header = write_envi(tmp_path_factory.mktemp("envi"), fields, raw)
    expected = decode_envi(fields, raw)
    got = read_or_refuse(header)
    if expected is None:
        assert got is None, f"{fields} with {len(raw)} data bytes was read as {got.shape}"
    else:
        assert got is not None, f"a valid header was refused: {fields}"
        np.testing.assert_array_equal(got, expected)


def test_envi_samples_disagreeing_with_data_size_are_refused(tmp_path):
    """The fault this hardening started from: `samples = 50` on 100-sample data read a garbage map."""
    cube = (np.arange(10 * 100 * 3) % 1000).astype("<u2").reshape(10, 100, 3)
    fields = {"samples": "100", "lines": "10", "bands": "3", "data type": "12", "interleave": "bip",
              "byte order": "0"}
    header = write_envi(tmp_path, fields, cube.tobytes())
    np.testing.assert_array_equal(read_cube(header), cube)
    for samples, size in (("50", 3000), ("101", 6060), ("99", 5940)):
        write_envi(tmp_path, {**fields, "samples": samples}, cube.tobytes())
        msg = refusal(open_scene, header, names=header)
        assert f"expected {size} bytes" in msg and "found 6000 bytes" in msg
        assert ("too small" if size > 6000 else "too large") in msg
    write_envi(tmp_path, {**fields, "header offset": "-4"}, cube.tobytes())
    assert "expected a whole number >= 0 for 'header offset', found '-4'" in refusal(open_scene, header,
                                                                                    names=header)


@pytest.mark.filterwarnings("ignore:.*byte order")
def test_real_envi_cube_with_a_wrong_samples_count(tmp_path, datasets):
    """The PlantCV cube (31 lines x 43 samples x 580 bands, uint16, 1546280 bytes), its header
    copied with a wrong `samples`: refused with both sizes; the true header reads it unchanged."""
    source = datasets / "plantcv_corn_kernel" / "corn-kernel-hyperspectral.hdr"
    raw = tmp_path / "corn.raw"
    raw.symlink_to(source.with_suffix(".raw"))  # a link to a regular file is a regular file
    text = source.read_text()
    assert "samples = 43" in text
    (tmp_path / "corn.hdr").write_text(text)
    reference = np.fromfile(raw, dtype="<u2").reshape(31, 580, 43).transpose(0, 2, 1)
    np.testing.assert_array_equal(read_cube(tmp_path / "corn.hdr"), reference)
    for samples in (42, 44, 21):
        (tmp_path / "corn.hdr").write_text(text.replace("samples = 43", f"samples = {samples}"))
        msg = refusal(open_scene, tmp_path / "corn.hdr", names=raw)
        assert f"expected {31 * samples * 580 * 2} bytes" in msg and "found 1546280 bytes" in msg


# ------------------------------------------------------------------------------------ MATLAB files

CUBE = (np.arange(6 * 7 * 5) * 37 % 1009).astype(np.uint16).reshape(6, 7, 5)
GT = (np.arange(6 * 7) % 5).astype(np.uint8).reshape(6, 7)


@pytest.fixture(scope="module")
def v73_file(tmp_path_factory) -> bytes:
    """A small MATLAB v7.3 file: a chunked, compressed, checksummed cube and a label map."""
    path = tmp_path_factory.mktemp("v73") / "s.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("cube", data=CUBE.T, chunks=(5, 4, 3), compression="gzip", fletcher32=True)
        f.create_dataset("gt", data=GT.T)
    return path.read_bytes()


@pytest.fixture(scope="module")
def v5_files(tmp_path_factory) -> list[bytes]:
    """Small MATLAB v5 files, uncompressed and compressed, with a cube, a label map and the
    cell, struct and text arrays whose layout scipy's reader walks."""
    out = []
    for compress in (False, True):
        path = tmp_path_factory.mktemp("v5") / "s.mat"
        sio.savemat(path, {"cube": CUBE, "gt": GT, "name": "scene", "meta": {"sensor": "AVIRIS", "gsd": 20.0},
                           "cood": np.array(["1-tree", "2-water"], dtype=object)}, do_compression=compress)
        out.append(path.read_bytes())
    return out


def damaged(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data if cut is None else data[:cut % (len(data) + 1)])
    for pos, bit in flips:
        if b:
            b[pos % len(b)] ^= 1 << bit
    return bytes(b)


faults = st.tuples(st.one_of(st.none(), st.integers(0, 10**6)),
                   st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=3))


def check_mat(path: Path, cut_only: bool) -> None:
    """A damaged .mat is refused in one sentence or read; a file only cut short reads exactly
    the written arrays.  A flipped bit in data or in a type field of a format without checksums
    (v5; v7.3 metadata) can give other values that no reader could tell apart: those must
    still come out as a well-formed scene or label map, never as another error or a crash."""
    cube = read_or_refuse(path, key="cube")
    if cube is not None:
        assert cube.ndim == 3 and cube.size
        if cut_only:
            np.testing.assert_array_equal(cube, CUBE)
    gt = labels_or_refuse(path, key="gt")
    if gt is not None:
        assert gt.ndim == 2 and gt.dtype in (np.uint8, np.uint16)
        if cut_only:
            np.testing.assert_array_equal(gt, GT)


@SETTINGS
@given(fault=faults)
def test_damaged_v73_mat(tmp_path_factory, v73_file, fault):
    path = tmp_path_factory.mktemp("v73") / "s.mat"
    cut, flips = fault
    path.write_bytes(damaged(v73_file, cut, flips))
    check_mat(path, cut_only=not flips)


@SETTINGS
@given(fault=faults, which=st.sampled_from([0, 1]), word=st.one_of(st.none(), st.tuples(
    st.integers(0, 10**6), st.sampled_from([0, 3, 8, 15, 19, 20, 44, 0xFFFF, 2**31, 2**32 - 1]))))
def test_damaged_v5_mat(tmp_path_factory, v5_files, fault, which, word):
    """Also overwrites one aligned 4-byte word (a tag's type or size, a dimension) with a value
    scipy's reader has no table entry or no memory for."""
    data = bytearray(v5_files[which])
    if word is not None:
        pos = 128 + 4 * (word[0] % ((len(data) - 128) // 4))
        data[pos:pos + 4] = struct.pack("<I", word[1])
    path = tmp_path_factory.mktemp("v5") / "s.mat"
    cut, flips = fault
    path.write_bytes(damaged(bytes(data), cut, flips))
    check_mat(path, cut_only=not flips and word is None)


def _v5_with(path: Path, arrays: dict, offset: int, value: int) -> Path:
    """A v5 file with the 4-byte word at `offset` of its first variable replaced."""
    sio.savemat(path, arrays)
    data = bytearray(path.read_bytes())
    data[128 + offset:128 + offset + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))
    return path


def test_v5_files_scipy_would_crash_on_are_refused(tmp_path):
    """scipy's v5 reader segfaults (or allocates without bound) on these: they are refused
    beforehand.  Read in a child process, so that a regression fails this test, not the run."""
    cases = [  # arrays, byte offset in the first variable, new 4-byte value, reason given
        # variable tag 0-7, array flags 8-23, dimensions tag 24-31 and values 32-39 (2-D) or 32-47
        # (3-D, padded), name 40-47 or 48-55, then the data tag
        ({"x": CUBE}, 56, 44, "unknown type 44"),  # scipy indexes its type table with the type
        ({"x": CUBE}, 56, 14, "unknown type 14"),  # a nested array where numbers belong
        ({"x": "ab"}, 28, 0, "a text array has no dimensions"),  # scipy reads dims[-1]
        ({"x": {"f": 1.0}}, 32, 2**29, "claims 536870912 items"),  # scipy allocates 4 GB first
    ]
    paths = [_v5_with(tmp_path / f"{i}.mat", *case[:3]) for i, case in enumerate(cases)]
    child = subprocess.run([sys.executable, "-c", CHILD_READS, *map(str, paths)], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, f"the reader crashed ({child.returncode}): {child.stderr[-2000:]}"
    lines = child.stdout.splitlines()
    assert len(lines) == 2 * len(cases), child.stdout
    for i, (path, case) in enumerate(zip(paths, cases, strict=True)):
        for msg in lines[2 * i:2 * i + 2]:  # open_scene, read_labels
            assert msg.startswith(f"refused: {path}: expected a MATLAB .mat file, but it is damaged")
            assert case[3] in msg


CHILD_READS = """
import sys
from hsiedge.io import SceneReadError, open_scene, read_labels
for path in sys.argv[1:]:
    for read in (open_scene, read_labels):
        try:
            read(path)
            print("read")
        except SceneReadError as e:
            print("refused:", e)
"""


@SETTINGS
@given(cut=st.integers(0, 10**5))
def test_real_label_maps_cut_short(tmp_path_factory, datasets, cut):
    """Real v7.3 (KSC) and v5 (Indian Pines) label maps cut anywhere: refused or exact."""
    for rel in ("ksc/KSC_gt.mat", "indian_pines/Indian_pines_gt.mat"):
        data = (datasets / rel).read_bytes()
        whole = read_labels(datasets / rel).labels
        path = tmp_path_factory.mktemp("gt") / "gt.mat"
        path.write_bytes(data[:cut % (len(data) + 1)])
        got = labels_or_refuse(path)
        if got is not None:
            np.testing.assert_array_equal(got, whole)


# ------------------------------------------------------------------------------------------- .npy

REAL = ["u1", "i2", ">u2", "<i4", "u8", "f2", "f4", ">f8"]
NOT_REAL = ["c8", "c16", "U3", "S2", "O", "i4,f4", "M8[s]", "m8[s]", "V4", "?", "g"]


@SETTINGS
@given(dtype=st.sampled_from(REAL + NOT_REAL), shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
       change=st.sampled_from([None, None, "cut", "extend"]), where=st.integers(0, 10**4))
def test_npy_dtypes_shapes_and_sizes(tmp_path_factory, dtype, shape, change, where):
    """Only a whole, non-empty 3-D (scene) or 2-D (labels) array of a real type is read, exactly;
    everything else, a cut or extended file included, is refused in one sentence."""
    arr = (np.arange(int(np.prod(shape))) % 7).reshape(shape).astype(dtype)
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    np.save(path, arr, allow_pickle=True)
    data = path.read_bytes()
    if change == "cut":
        path.write_bytes(data[:where % len(data)])
    elif change == "extend":
        path.write_bytes(data + bytes(1 + where % 64))
    whole = change is None
    real = np.dtype(dtype).kind in "uif" and np.dtype(dtype).itemsize <= 8 and np.dtype(dtype).names is None
    got = read_or_refuse(path)
    if whole and real and arr.ndim == 3 and arr.size:
        np.testing.assert_array_equal(got, arr)
    else:
        assert got is None
    labels = labels_or_refuse(path)
    if whole and (real or dtype == "?") and arr.ndim == 2 and arr.size:
        np.testing.assert_array_equal(labels, arr)
    else:
        assert labels is None


def test_empty_npy_is_refused(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    assert "expected a NumPy .npy array" in refusal(open_scene, tmp_path / "e.npy", names=tmp_path / "e.npy")
    refusal(read_labels, tmp_path / "e.npy", names=tmp_path / "e.npy")


# ------------------------------------------------------- one rule for types and sizes, every format

def _geotiff(path: Path, dtype: str, shape=(3, 4, 2)) -> Path:
    with rasterio.open(path, "w", driver="GTiff", height=shape[0], width=shape[1], count=shape[2],
                       dtype=dtype) as dst:
        dst.write(np.ones((shape[2], *shape[:2]), dtype="complex64" if "complex" in dtype else dtype))
    return path


def _complex_files(folder: Path) -> list[tuple[Path, str]]:
    cube = (np.arange(24).reshape(3, 4, 2) * (1 + 2j)).astype(np.complex64)
    np.save(folder / "c.npy", cube)
    sio.savemat(folder / "c5.mat", {"x": cube})
    with h5py.File(folder / "c73.mat", "w") as f:  # MATLAB's v7.3 complex: (real, imag) records
        records = np.zeros(cube.T.shape, dtype=[("real", "<f4"), ("imag", "<f4")])
        records["real"], records["imag"] = cube.T.real, cube.T.imag
        f["x"] = records
    cube.tofile(folder / "c.img")
    (folder / "c.hdr").write_text("ENVI\nsamples = 4\nlines = 3\nbands = 2\ndata type = 6\ninterleave = bip\n"
                                  "byte order = 0\n")
    return [*((folder / name, "complex64") for name in ("c.npy", "c5.mat", "c73.mat", "c.hdr")),
            (_geotiff(folder / "c.tif", "complex64"), "complex64"),
            (_geotiff(folder / "ci.tif", "complex_int16"), "complex_int16")]


def test_complex_data_is_refused_alike_in_every_format(tmp_path):
    for path, found in _complex_files(tmp_path):
        msg = refusal(open_scene, path, names=path)
        assert msg.endswith(f"expected real-valued integer or floating-point bands, found {found}"), msg
    np.save(tmp_path / "gt.npy", np.ones((3, 4), np.complex64))
    assert "found complex64" in refusal(read_labels, tmp_path / "gt.npy", names=tmp_path / "gt.npy")


def test_scenes_without_pixels_or_bands_are_refused(tmp_path):
    sio.savemat(tmp_path / "z5.mat", {"x": np.zeros((0, 4, 2))})
    with h5py.File(tmp_path / "z73.mat", "w") as f:
        f["x"] = np.zeros((2, 0, 3), np.uint16)
    np.save(tmp_path / "z.npy", np.zeros((3, 4, 0), np.float32))
    np.save(tmp_path / "gt.npy", np.zeros((0, 4), np.uint8))
    for name in ("z5.mat", "z73.mat", "z.npy"):
        msg = refusal(open_scene, tmp_path / name, names=tmp_path / name)
        assert "expected a scene of at least 1 row, 1 column and 1 band" in msg
    assert "at least one pixel" in refusal(read_labels, tmp_path / "gt.npy", names=tmp_path / "gt.npy")
    np.save(tmp_path / "big.npy", np.full((2, 2), 70_000, np.uint32))  # would wrap around in uint16
    assert "found 70000" in refusal(read_labels, tmp_path / "big.npy", names=tmp_path / "big.npy")


# ------------------------------------------------------------------------------ non-regular files

def _returns_quickly(fn, *args, **kw) -> BaseException | object:
    """fn's result or exception; fails (instead of hanging the suite) if it blocks."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn(*args, **kw))
        except BaseException as e:  # handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), f"{fn.__name__}{args} blocked"
    return out[0]


def test_fifos_sockets_and_devices_are_refused_at_once(tmp_path, datasets):
    real = datasets / "pavia_university" / "paviaU_subimg.mat"
    cases = []  # (function, path, file named in the message, what the message says it is)
    for name in ("scene.tif", "scene.npy", "scene.mat", "scene.hdr"):
        os.mkfifo(tmp_path / name)
        cases += [(open_scene, tmp_path / name, tmp_path / name, "FIFO"),
                  (read_labels, tmp_path / name, tmp_path / name, "FIFO")]
    cases += [(open_scene, Path("/dev/zero"), Path("/dev/zero"), "character device"),
              (read_labels, Path("/dev/null"), Path("/dev/null"), "character device")]
    (tmp_path / "sock").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock" / "s.npy"))
    cases.append((open_scene, tmp_path / "sock" / "s.npy", tmp_path / "sock" / "s.npy", "socket"))
    # an ENVI data file that is a FIFO, found next to its header or given directly
    (tmp_path / "e").mkdir()
    os.mkfifo(tmp_path / "e" / "s.img")
    (tmp_path / "e" / "s.hdr").write_text("ENVI\nsamples = 2\nlines = 2\nbands = 1\ndata type = 1\n")
    cases += [(open_scene, tmp_path / "e" / "s.hdr", tmp_path / "e" / "s.img", "FIFO"),
              (open_scene, tmp_path / "e" / "s.img", tmp_path / "e" / "s.img", "FIFO")]
    # a header that is a FIFO, next to the data file given; a FIFO sidecar GDAL would open
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "s.img").write_bytes(bytes(4))
    os.mkfifo(tmp_path / "h" / "s.hdr")
    cases.append((open_scene, tmp_path / "h" / "s.img", tmp_path / "h" / "s.hdr", "FIFO"))
    for sidecar in ("t.tif.aux.xml", "t.tfw", "t_rpc.txt"):
        folder = tmp_path / sidecar.replace(".", "-")
        folder.mkdir()
        _geotiff(folder / "t.tif", "uint16")
        os.mkfifo(folder / sidecar)
        cases.append((open_scene, folder / "t.tif", folder / sidecar, "FIFO"))
    try:
        for fn, path, named, kind in cases:
            e = _returns_quickly(fn, path)
            assert isinstance(e, SceneReadError), f"{fn.__name__}({path}) gave {e!r}"
            assert str(named) in str(e) and kind in str(e) and "\n" not in str(e), str(e)
    finally:
        sock.close()
    (tmp_path / "link.mat").symlink_to(real)  # a link to a regular file is fine
    np.testing.assert_array_equal(read_cube(tmp_path / "link.mat"), read_cube(real))
