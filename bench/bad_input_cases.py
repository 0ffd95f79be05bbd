"""The catalogue of `bench/bad_inputs.py`: shared setup, file helpers, and the bad-input
cases of each family (scenes, labels, checkpoints, manifests, signatures, outputs, resume,
arguments), each prepared in a fresh folder.  Random damage is seeded."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import rasterio
import scipy.io as sio
import torch
from rasterio.transform import from_origin
from typer.testing import CliRunner

from hsiedge.cli import app

REPO = Path(__file__).resolve().parents[1]
JASPER = REPO.parent / "shared" / "datasets" / "jasper_ridge"
SCENE_MAT = JASPER / "JasperRidge2_R198.mat"
LABELS_MAT = JASPER / "_EndJasperRidge2_R198.mat"
CRS = "EPSG:32610"  # UTM 10N, where Jasper Ridge is
TRANSFORM = from_origin(560000.0, 4140000.0, 20.0, 20.0)
SIDE = 40  # the infer scene: a SIDE x SIDE crop keeps every run short
FAMILIES = ("scenes", "labels", "checkpoints", "manifests", "signatures", "outputs", "resume", "arguments")
# Top-level manifest keys a bundle may lack (schema defaults); removing one is a harmless variant.
OPTIONAL_MANIFEST_KEYS = {"created", "scan_calls", "calibration", "exporters", "training", "parity",
                          "export_seconds", "engines"}
RUNNER = CliRunner()


class SetupError(RuntimeError):
    """The shared setup (training, export, keys) or a case's preparation failed."""


class Payload:
    """Pickled, it touches `marker` when unpickled: proof that a reader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------
# Cases, runs, outcomes


@dataclass
class Run:
    """A prepared case: the command line, what it must leave unchanged, what must not appear."""

    argv: list[str]
    inputs: list[Path]
    outputs: list[Path] = field(default_factory=list)
    marker: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None


@dataclass
class Case:
    """One bad input: `prepare(folder)` writes its files into a fresh folder and returns its Run."""

    family: str
    name: str
    prepare: Callable[[Path], Run]
    bad: bool = True  # False: a harmless variant, for which exit 0 is also a right answer
    isolate: str = ""  # "hang" or "crash": run in a subprocess, killed after ISOLATED_SECONDS[isolate]


# ---------------------------------------------------------------------------------------------
# Files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path) -> Any:
    """What `path` is, without opening anything that could block: a file's sha256, a link's
    target, a folder's entries, a FIFO's type; None when it is not there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(mode):
        return ("dir", tuple((p.name, fingerprint(p)) for p in sorted(path.iterdir())))
    if stat.S_ISREG(mode):
        return ("file", sha256_file(path))
    return ("special", stat.S_IFMT(mode))


def exists(path: Path) -> bool:
    return os.path.lexists(path)


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for pos in positions:
        out[pos] ^= 1 << (pos % 8)
    return bytes(out)


def write_geotiff(path: Path, cube: np.ndarray) -> Path:
    """A (rows, cols, bands) cube as a georeferenced GeoTIFF."""
    h, w, b = cube.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=b, dtype=cube.dtype.name,
                       crs=CRS, transform=TRANSFORM, interleave="pixel") as dst:
        dst.write(cube.transpose(2, 0, 1))
    return path


def write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A MATLAB v7.3 file as MATLAB writes it: HDF5 behind a 512-byte header, arrays column-major."""
    classes = {"uint8": "uint8", "uint16": "uint16", "int16": "int16", "float32": "single",
               "float64": "double"}
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, a in arrays.items():
            ds = f.create_dataset(name, data=np.ascontiguousarray(a.T))
            ds.attrs["MATLAB_class"] = np.bytes_(classes.get(a.dtype.name, "double"))
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  1 00:00:00 2025 HDF5 schema 1.00 ."
    with path.open("r+b") as f:
        f.write(text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")
    return path


def mat73_data_offset(path: Path, name: str) -> int:
    """Where the raw data of `name` starts: bytes before it are HDF5 metadata."""
    with h5py.File(path, "r") as f:
        return int(f[name].id.get_offset())


def write_envi(folder: Path, cube: np.ndarray, data: bytes | None = None,
               **fields: str | None) -> tuple[Path, Path]:
    """An ENVI BSQ cube: (header, data file).  `fields` override header lines (None drops one)."""
    h, w, b = cube.shape
    lines = {"samples": str(w), "lines": str(h), "bands": str(b), "header offset": "0",
             "file type": "ENVI Standard", "data type": "12", "interleave": "bsq", "byte order": "0"}
    for key, value in fields.items():
        key = key.replace("_", " ")
        if value is None:
            lines.pop(key, None)
        else:
            lines[key] = value
    header, raw = folder / "scene.hdr", folder / "scene.img"
    header.write_text("ENVI\n" + "".join(f"{k} = {v}\n" for k, v in lines.items()))
    raw.write_bytes(cube.transpose(2, 0, 1).astype("<u2").tobytes() if data is None else data)
    return header, raw


def npy_with_shape(path: Path, shape: tuple[int, ...], payload: bytes) -> Path:
    """A .npy whose header claims `shape` (uint16) followed by `payload` bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u2", "fortran_order": False, "shape": shape})
    path.write_bytes(header.getvalue() + payload)
    return path


def zip_entry(data: bytes, suffix: str, largest: bool = False) -> tuple[int, int]:
    """(start, size) of the stored bytes of a zip entry ending in `suffix` (or of the largest)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = [i for i in z.infolist() if i.filename.endswith(suffix) or largest]
        info = max(infos, key=lambda i: i.compress_size) if largest else infos[0]
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


DEEP_MARKER = "deep-nesting-goes-here"


def deep_pickle(path: Path, depth: int) -> Path:
    """Replace the string DEEP_MARKER in a torch.save file by a `depth`-deep nested list, written
    as pickle opcodes (EMPTY_LIST `depth` times, then APPEND): pickling such a list would overflow
    the stack, unpickling it needs none."""
    text = DEEP_MARKER.encode()
    old = b"X" + struct.pack("<I", len(text)) + text  # BINUNICODE
    new = b"]" * depth + b"a" * (depth - 1)
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, content in entries:
            if info.filename.endswith("data.pkl"):
                if old not in content:
                    raise SetupError("the marker is not in the checkpoint's pickle")
                content = content.replace(old, new)
            z.writestr(info, content)
    return path


# ---------------------------------------------------------------------------------------------
# Setup


def cli(argv: list[str], env: dict[str, str] | None = None) -> Any:
    """Run `hsiedge ARGV` in-process; a failure is a SetupError with the output."""
    res = RUNNER.invoke(app, argv, env=env)
    if res.exit_code != 0:
        raise SetupError(f"hsiedge {' '.join(argv[:2])} failed ({res.exit_code}): "
                         f"{(res.output or repr(res.exception)).strip()[-400:]}")
    return res


@dataclass
class Base:
    """What every case starts from."""

    work: Path
    cube: np.ndarray  # Jasper Ridge (100, 100, 198) uint16
    ckpt: Path
    bundle: Path
    signed: Path  # the bundle, signed with owner
    scene: Path  # SIDE x SIDE GeoTIFF crop
    owner: Path  # private keys; KEY.pub beside each
    stranger: Path

    @property
    def crop(self) -> np.ndarray:
        return self.cube[:SIDE, :SIDE]

    def pub(self, key: Path) -> Path:
        return key.with_name(key.name + ".pub")


def jasper_cube() -> np.ndarray:
    d = sio.loadmat(SCENE_MAT)
    nr, nc = int(d["nRow"][0, 0]), int(d["nCol"][0, 0])
    return np.ascontiguousarray(d["Y"].reshape(-1, nr, nc, order="F").transpose(1, 2, 0))


def set_up(work: Path) -> Base:
    """Train, export, write the scene, make the keys."""
    ckpt, bundle = work / "sm.pt", work / "bundle"
    cli(["train", "spectralmamba", "--scene", str(SCENE_MAT), "--labels", str(LABELS_MAT), "--epochs", "2",
         "-o", str(ckpt)])
    cli(["export", str(ckpt), "-o", str(bundle)])
    cube = jasper_cube()
    scene = write_geotiff(work / "scene.tif", cube[:SIDE, :SIDE])
    keys = work / "keys"
    keys.mkdir()
    for name in ("owner", "stranger"):
        cli(["keygen", str(keys / f"{name}.key")])
    signed = work / "signed"
    shutil.copytree(bundle, signed)
    cli(["sign", str(signed), str(keys / "owner.key")])
    return Base(work, cube, ckpt, bundle, signed, scene, keys / "owner.key", keys / "stranger.key")


# ---------------------------------------------------------------------------------------------
# Commands


def infer(b: Base, d: Path, scene: Path, *extra: str, bundle: Path | None = None, out: Path | None = None,
          inputs: tuple[Path, ...] = ()) -> Run:
    """`hsiedge infer SCENE --bundle B -o OUT`."""
    bundle = bundle or b.bundle
    out = out or d / "map.tif"
    return Run(["infer", str(scene), "--bundle", str(bundle), "-o", str(out), *extra],
               [scene, bundle, *inputs], map_outputs(out, extra))


def map_outputs(out: Path, extra: tuple[str, ...]) -> list[Path]:
    """The final names an infer run writes: the map, its sidecar, probabilities, quick look."""
    outs = [out, out.with_name(out.name + ".aux.xml"), out.with_name(out.stem + ".probs.tif")]
    if "--quicklook" in extra:
        outs.append(Path(extra[extra.index("--quicklook") + 1]))
    return outs


def parity(b: Base, bundle: Path, *extra: str, scene: Path | None = None) -> Run:
    """`hsiedge parity-check B --scene S`."""
    scene = scene or b.scene
    return Run(["parity-check", str(bundle), "--scene", str(scene), *extra], [bundle, scene])


def train(d: Path, scene: Path, labels: Path, *extra: str, out: Path | None = None) -> Run:
    """`hsiedge train spectralmamba --scene S --labels L -o OUT --epochs 1`."""
    out = out or d / "m.pt"
    return Run(["train", "spectralmamba", "--scene", str(scene), "--labels", str(labels), "-o", str(out),
                "--epochs", "1", *extra], [scene, labels], [out])


def export(ckpt: Path, d: Path, *extra: str, out: Path | None = None) -> Run:
    """`hsiedge export CKPT -o OUT`."""
    out = out or d / "bundle"
    return Run(["export", str(ckpt), "-o", str(out), *extra], [ckpt], [out])


def copy_bundle(src: Path, d: Path, name: str = "b") -> Path:
    return Path(shutil.copytree(src, d / name, symlinks=True))


def read_manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def write_manifest(bundle: Path, manifest: Any) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """Rewrite manifest.json after `change(manifest)`, as an attacker would: no checks."""
    m = read_manifest(bundle)
    change(m)
    write_manifest(bundle, m)
    return bundle


def first_std(text: str, value: str) -> str:
    """The manifest text with the first standardisation std replaced by `value` (a raw JSON token)."""
    return re.sub(r'("std": \[\s*)[^,\]\s]+', lambda m: m.group(1) + value, text, count=1)


def set_at(m: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node = m
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def rehash(bundle: Path, kind: str = "onnx") -> None:
    """Update an artifact's sha256 (and size) in the manifest: consistent tampering."""
    def change(m: dict[str, Any]) -> None:
        f = bundle / m["artifacts"][kind]["file"]
        m["artifacts"][kind]["sha256"] = sha256_file(f)
        if "bytes" in m["artifacts"][kind]:
            m["artifacts"][kind]["bytes"] = f.stat().st_size
    edit_manifest(bundle, change)


def interrupt(b: Base, scene: Path, out: Path, *extra: str, bundle: Path | None = None) -> None:
    """An infer run (--tile 10) stopped after 2 tiles as a killed one is, leaving staging and journal."""
    from hsiedge.infer.staging import Staging

    record = Staging.record
    calls = [0]

    def dies(self: Any, *a: Any) -> None:
        calls[0] += 1
        if calls[0] > 2:
            raise KeyboardInterrupt
        record(self, *a)

    Staging.record = dies
    try:
        RUNNER.invoke(app, ["infer", str(scene), "--bundle", str(bundle or b.bundle), "-o", str(out),
                            "--tile", "10", *extra])
    except KeyboardInterrupt:  # the interruption itself (CliRunner may also turn it into an exit)
        pass
    finally:
        Staging.record = record
    if not out.with_name(f".{out.name}.journal").is_file():
        raise SetupError(f"the interrupted run left no journal next to {out}")


# ---------------------------------------------------------------------------------------------
# Families


def scene_cases(b: Base, rng: random.Random) -> list[Case]:
    """Scenes given to `hsiedge infer`: ENVI, MATLAB v7.3 / v5, .npy, GeoTIFF, special files."""
    cases: list[Case] = []
    crop = b.crop
    raw = crop.transpose(2, 0, 1).astype("<u2").tobytes()
    band = SIDE * SIDE * 2

    def add(name: str, prepare: Callable[[Path], Run], **kw: Any) -> None:
        cases.append(Case("scenes", name, prepare, **kw))

    def envi(data: bytes | None = None, **fields: str | None) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            header, data_file = write_envi(d, crop, data, **fields)
            return infer(b, d, header, inputs=(data_file,))
        return prepare

    add("ENVI data 1 byte short", envi(raw[:-1]))
    add("ENVI data half the size", envi(raw[:len(raw) // 2]))
    add("ENVI data file empty", envi(b""))
    add("ENVI data 1 byte long", envi(raw + b"\0"))
    add("ENVI data one band long", envi(raw + raw[:band]))
    for key in ("samples", "lines", "bands", "data_type", "header_offset"):
        for value in ("-1", "0", "abc"):
            if key == "header_offset" and value == "0":
                value = "99999999999"  # 0 is the valid default: an offset past the end instead
            add(f"ENVI {key.replace('_', ' ')} = {value}", envi(**{key: value}))
    add("ENVI samples = 1e3", envi(samples="1e3"))
    add("ENVI data type = 99", envi(data_type="99"))
    add("ENVI byte order = 7", envi(byte_order="7"))
    add("ENVI interleave = zigzag", envi(interleave="zigzag"))
    add("ENVI samples missing", envi(samples=None))

    def envi_no_data(d: Path) -> Run:
        header, data_file = write_envi(d, crop)
        data_file.unlink()
        return infer(b, d, header)
    add("ENVI header without a data file", envi_no_data)

    def envi_fifo(d: Path) -> Run:
        header, data_file = write_envi(d, crop)
        data_file.unlink()
        os.mkfifo(data_file)
        return infer(b, d, header, inputs=(data_file,))
    add("ENVI data file is a FIFO", envi_fifo, isolate="hang")

    # MATLAB v7.3 (HDF5): truncated and bit-flipped; run apart, a damaged HDF5 file can crash its reader
    def mat73(cut: float | None = None, flips: Callable[[int, int], list[int]] | None = None,
              arrays: Callable[[], dict[str, np.ndarray]] | None = None) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            path = write_mat73(d / "scene.mat", arrays() if arrays else {"cube": crop})
            data = path.read_bytes()
            if cut is not None:
                data = data[:int(cut)] if cut > 1 else data[:int(len(data) * cut)]
            if flips is not None:
                data = flip_bits(data, flips(len(data), mat73_data_offset(path, "cube")))
            path.write_bytes(data)
            return infer(b, d, path)
        return prepare

    for cut in (0.5, 0.9, 4096, 600, 512):
        add(f"MAT v7.3 truncated to {cut if cut > 1 else f'{cut:.0%}'}" + (" bytes" if cut > 1 else ""),
            mat73(cut=cut), isolate="crash")
    add("MAT v7.3 HDF5 signature flipped", mat73(flips=lambda n, o: [513]), isolate="crash")
    add("MAT v7.3 superblock version flipped", mat73(flips=lambda n, o: [520]), isolate="crash")
    for i in range(4):
        seed = rng.randrange(1 << 30)
        add(f"MAT v7.3 3 random bit flips in metadata #{i + 1}",
            mat73(flips=lambda n, o, s=seed: random.Random(s).sample(range(512, o), 3)),
            isolate="crash", bad=False)
    add("MAT v7.3 complex cube", mat73(arrays=lambda: {"cube": crop.astype(np.complex64)}), isolate="crash")
    add("MAT v7.3 2-D array only", mat73(arrays=lambda: {"cube": crop[:, :, 0]}), isolate="crash")

    # MATLAB v5 (scipy)
    def mat5(cut: float | None = None, flips: list[int] | None = None,
             arrays: Callable[[], dict[str, Any]] | None = None) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            path = d / "scene.mat"
            sio.savemat(path, arrays() if arrays else {"cube": crop})
            data = path.read_bytes()
            if cut is not None:
                data = data[:int(cut)] if cut > 1 else data[:int(len(data) * cut)]
            if flips is not None:
                data = flip_bits(data, flips)
            path.write_bytes(data)
            return infer(b, d, path)
        return prepare

    for cut in (0.5, 0.99, 200, 128):
        add(f"MAT v5 truncated to {cut if cut > 1 else f'{cut:.0%}'}" + (" bytes" if cut > 1 else ""),
            mat5(cut=cut), isolate="crash")
    add("MAT v5 endian indicator flipped", mat5(flips=[126]), isolate="crash")
    add("MAT v5 array tag type flipped", mat5(flips=[128]), isolate="crash")
    for i in range(4):
        flips = rng.sample(range(128, 200), 2)
        add(f"MAT v5 2 random bit flips in the array header #{i + 1}", mat5(flips=flips), isolate="crash",
            bad=False)
    add("MAT v5 complex cube", mat5(arrays=lambda: {"cube": crop.astype(np.complex64)}), isolate="crash")
    add("MAT v5 string array", mat5(arrays=lambda: {"cube": np.array(["abc"] * 8)}), isolate="crash")

    def scene_named(name: str) -> Callable[[Callable[[Path], Any]], Callable[[Path], Run]]:
        """Cases whose scene is the file `name`, written by `make`, run through infer."""
        def case(make: Callable[[Path], Any]) -> Callable[[Path], Run]:
            def prepare(d: Path) -> Run:
                make(d / name)
                return infer(b, d, d / name)
            return prepare
        return case

    # .npy
    npy = scene_named("scene.npy")

    add(".npy string dtype", npy(lambda p: np.save(p, np.full((SIDE, SIDE, 198), "ab"))))
    add(".npy structured dtype",
        npy(lambda p: np.save(p, np.zeros((SIDE, SIDE, 198), dtype=[("a", "<u2"), ("b", "<f4")]))))
    add(".npy complex dtype", npy(lambda p: np.save(p, crop.astype(np.complex64))))
    add(".npy datetime dtype", npy(lambda p: np.save(p, np.zeros((SIDE, SIDE, 198), "datetime64[s]"))))

    def npy_object(d: Path) -> Run:
        arr = np.empty((2, 2, 198), dtype=object)
        arr[0, 0, 0] = Payload(d / "pwned")
        np.save(d / "scene.npy", arr, allow_pickle=True)
        run = infer(b, d, d / "scene.npy")
        run.marker = d / "pwned"
        return run
    add(".npy object dtype with a pickle payload", npy_object)
    add("empty file named .npy", npy(lambda p: p.write_bytes(b"")))
    add(".npy truncated (half the data)", npy(lambda p: (np.save(p, crop), p.write_bytes(p.read_bytes()[
        :p.stat().st_size // 2]))))
    add(".npy truncated in its header", npy(lambda p: (np.save(p, crop), p.write_bytes(p.read_bytes()[:30]))))
    add(".npy zero rows", npy(lambda p: np.save(p, np.zeros((0, SIDE, 198), np.uint16))))
    add(".npy zero bands", npy(lambda p: np.save(p, np.zeros((SIDE, SIDE, 0), np.uint16))))
    add(".npy 2-D array", npy(lambda p: np.save(p, crop[:, :, 0])))
    add(".npy header claims 100000 x 100000 x 198", npy(lambda p: npy_with_shape(
        p, (100_000, 100_000, 198), b"\0" * 4096)))

    # GeoTIFF and special files
    tif = scene_named("scene.tif")

    add("complex GeoTIFF", tif(lambda p: write_geotiff(p, crop.astype(np.complex64))))
    add("GeoTIFF with 100 bands (wrong band count)", tif(lambda p: write_geotiff(p, crop[:, :, :100])))
    add("GeoTIFF truncated to half", tif(lambda p: (write_geotiff(p, crop), p.write_bytes(
        p.read_bytes()[:p.stat().st_size // 2]))))
    add("empty file named .tif", tif(lambda p: p.write_bytes(b"")))
    add("text file named .tif", tif(lambda p: p.write_text("not an image\n")))
    add("FIFO named scene.tif", tif(os.mkfifo), isolate="hang")
    add("directory named scene.tif", tif(Path.mkdir))
    add("scene that does not exist", tif(lambda p: None))
    add("symlink loop named scene.tif", tif(lambda p: p.symlink_to(p)))
    return cases


def label_cases(b: Base, rng: random.Random) -> list[Case]:
    """Label files given to `hsiedge train` with the real Jasper Ridge scene."""
    cases: list[Case] = []
    truth = sio.loadmat(LABELS_MAT)
    labels = (np.asarray(truth["A"]).argmax(0).reshape(100, 100, order="F") + 1).astype(np.uint8)

    def add(name: str, make: Callable[[Path], Path], **kw: Any) -> None:
        def prepare(d: Path) -> Run:
            path = make(d)
            run = train(d, SCENE_MAT, path)
            if name.endswith("payload"):
                run.marker = d / "pwned"
            return run
        cases.append(Case("labels", name, prepare, **kw))

    def saved(name: str, array: Any, **kw: Any) -> Callable[[Path], Path]:
        def make(d: Path) -> Path:
            np.save(d / name, array, **kw)
            return d / name
        return make

    def cut(d: Path) -> Path:
        np.save(d / "gt.npy", labels)
        data = (d / "gt.npy").read_bytes()
        (d / "gt.npy").write_bytes(data[:len(data) // 2])
        return d / "gt.npy"

    def cut_mat(d: Path) -> Path:
        data = LABELS_MAT.read_bytes()
        (d / "gt.mat").write_bytes(data[:len(data) // 2])
        return d / "gt.mat"

    def cut_mat73(d: Path) -> Path:
        write_mat73(d / "gt.mat", {"gt": labels})
        data = (d / "gt.mat").read_bytes()
        (d / "gt.mat").write_bytes(data[:len(data) * 3 // 4])
        return d / "gt.mat"

    def payload(d: Path) -> Path:
        arr = np.empty((100, 100), dtype=object)
        arr[0, 0] = Payload(d / "pwned")
        np.save(d / "gt.npy", arr, allow_pickle=True)
        return d / "gt.npy"

    def special(kind: str) -> Callable[[Path], Path]:
        def make(d: Path) -> Path:
            path = d / "gt.npy"
            {"fifo": os.mkfifo, "dir": Path.mkdir, "empty": lambda p: p.write_bytes(b"")}[kind](path)
            return path
        return make

    def complex_tif(d: Path) -> Path:
        return write_geotiff(d / "gt.tif", labels[:, :, None].astype(np.complex64))

    def complex_mat(d: Path) -> Path:
        sio.savemat(d / "gt.mat", {"gt": labels.astype(np.complex64)})
        return d / "gt.mat"

    huge = labels.astype(np.int64)
    huge[0, 0] = 2**31 - 1
    negative = labels.astype(np.int16)
    negative[:3] = -1
    nan = labels.astype(np.float32)
    nan[5, 5] = np.nan
    add("labels .npy truncated", cut)
    add("labels .npy complex", saved("gt.npy", labels.astype(np.complex64)))
    add("labels .npy strings", saved("gt.npy", labels.astype(str)))
    add("labels .npy object dtype with a pickle payload", payload)
    add("labels .mat (v5) truncated", cut_mat, isolate="crash")
    add("labels .mat (v7.3) truncated", cut_mat73, isolate="crash")
    add("labels .mat complex", complex_mat)
    add("labels GeoTIFF complex", complex_tif)
    add("labels FIFO", special("fifo"), isolate="hang")
    add("labels directory", special("dir"))
    add("labels empty file", special("empty"))
    add("labels of another size (50 x 50)", saved("gt.npy", labels[:50, :50]))
    add("labels with negative class ids", saved("gt.npy", negative))
    add("labels with NaN", saved("gt.npy", nan))
    add("labels with class id 2**31 - 1", saved("gt.npy", huge), isolate="crash")
    return cases


def checkpoint_cases(b: Base, rng: random.Random) -> list[Case]:
    """Checkpoints given to `hsiedge export`."""
    cases: list[Case] = []
    data = b.ckpt.read_bytes()
    real = torch.load(b.ckpt, weights_only=True)

    def add(name: str, make: Callable[[Path], Path], **kw: Any) -> None:
        def prepare(d: Path) -> Run:
            run = export(make(d), d)
            if name.endswith("payload"):
                run.marker = d / "pwned"
            return run
        cases.append(Case("checkpoints", name, prepare, **kw))

    def raw(content: bytes) -> Callable[[Path], Path]:
        def make(d: Path) -> Path:
            (d / "m.pt").write_bytes(content)
            return d / "m.pt"
        return make

    def edited(change: Callable[[dict[str, Any]], Any],
               keep_checksum: bool = False) -> Callable[[Path], Path]:
        def make(d: Path) -> Path:
            obj = torch.load(b.ckpt, weights_only=True)
            if not keep_checksum:
                obj.pop("checksum", None)
            change(obj)
            torch.save(obj, d / "m.pt")
            return d / "m.pt"
        return make

    for frac in (0.1, 0.5, 0.9):
        add(f"truncated to {frac:.0%}", raw(data[:int(len(data) * frac)]))
    add("truncated by 1 byte", raw(data[:-1]))
    start, size = zip_entry(data, "", largest=True)
    for i in range(3):
        flips = rng.sample(range(start, start + size), 3)
        add(f"3 bit flips in the weights #{i + 1}", raw(flip_bits(data, flips)))
    start, size = zip_entry(data, "data.pkl")
    for i in range(2):
        flips = rng.sample(range(start, start + size), 2)
        add(f"2 bit flips in the pickle #{i + 1}", raw(flip_bits(data, flips)), bad=False)
    add("empty file", raw(b""))
    add("text file", raw(b"this is not a checkpoint\n"))

    def torch_payload(d: Path) -> Path:
        torch.save({**real, "metrics": Payload(d / "pwned")}, d / "m.pt")
        return d / "m.pt"

    def pickle_payload(d: Path) -> Path:
        (d / "m.pt").write_bytes(pickle.dumps(Payload(d / "pwned")))
        return d / "m.pt"

    def special(kind: str) -> Callable[[Path], Path]:
        def make(d: Path) -> Path:
            if kind == "fifo":
                os.mkfifo(d / "m.pt")
            elif kind == "dir":
                (d / "m.pt").mkdir()
            return d / "m.pt"
        return make

    def deep(d: Path) -> Path:
        obj = {k: v for k, v in real.items() if k != "checksum"}
        torch.save({**obj, "metrics": DEEP_MARKER}, d / "m.pt")
        return deep_pickle(d / "m.pt", 100_000)

    add("torch.save with a pickle payload", torch_payload)
    add("plain pickle with a payload", pickle_payload)
    add("directory", special("dir"))
    add("FIFO", special("fifo"), isolate="hang")
    add("missing file", special("missing"))
    add("config d_model = 10**9", edited(lambda o: o["config"].update(d_model=10**9)), isolate="crash")
    add("config d_model = -4", edited(lambda o: o["config"].update(d_model=-4)))
    add("config with an unknown key", edited(lambda o: o["config"].update(warp_drive=1)))
    add("config is a string", edited(lambda o: o.update(config="d_model=16")))
    add("config num_classes = 0", edited(lambda o: o["config"].update(num_classes=0)))
    add("no state_dict", edited(lambda o: o.pop("state_dict")))
    add("unknown model name", edited(lambda o: o.update(model_name="resnet-9000")))
    add("a weight of another shape", edited(lambda o: o["state_dict"].update(
        {next(iter(o["state_dict"])): torch.zeros(3, 3)})))
    add("stale checksum (config changed, checksum kept)",
        edited(lambda o: o["config"].update(d_model=o["config"].get("d_model", 16) * 2), keep_checksum=True))
    add("10**5-deep nesting in metrics", deep, isolate="crash")
    return cases


def manifest_cases(b: Base, rng: random.Random) -> list[Case]:
    """Bundles with a damaged or tampered manifest, each given to `infer` and to `parity-check`."""
    variants: list[tuple[str, Callable[[Path, Path], Path], bool, str]] = []  # name, make, bad, isolate
    m0 = read_manifest(b.bundle)

    def variant(name: str, make: Callable[[Path, Path], Path], bad: bool = True, isolate: str = "") -> None:
        variants.append((name, make, bad, isolate))

    def edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path, Path], Path]:
        def make(d: Path, bundle: Path) -> Path:
            return edit_manifest(bundle, change)
        return make

    def raw_text(text: Callable[[str], str | bytes]) -> Callable[[Path, Path], Path]:
        def make(d: Path, bundle: Path) -> Path:
            new = text(json.dumps(read_manifest(bundle), indent=1))
            (bundle / "manifest.json").write_bytes(new.encode() if isinstance(new, str) else new)
            return bundle
        return make

    for key in m0:
        variant(f"key '{key}' removed", edit(lambda m, k=key: m.pop(k)),
                bad=key not in OPTIONAL_MANIFEST_KEYS)
    for path, value in ((("precision",), 16), (("input", "bands"), "198"), (("input", "patch_size"), 7.0),
                        (("classes",), {"1": "tree"}), (("artifacts",), ["model.onnx"]),
                        (("model", "config"), "d_model=16"), (("heldout", "key"), 5),
                        (("preprocessing", "transforms"), "standardize"), (("opset", "ai.onnx"), "18"),
                        (("input", "batch_dynamic"), "yes")):
        variant(f"{'.'.join(path)} = {json.dumps(value)} (wrong type)",
                edit(lambda m, p=path, v=value: set_at(m, p, v)))
    variant("manifest is a JSON list", raw_text(lambda t: f"[{t}]"))
    for path, value in ((("input", "bands"), 10**30), (("model", "config", "num_classes"), 2**63),
                        (("input", "patch_size"), 1e308)):
        variant(f"{'.'.join(path)} = {value:.0e} (huge)", edit(lambda m, p=path, v=value: set_at(m, p, v)))
    digits = "9" * 5000
    variant("artifacts.onnx.bytes has 5000 digits",
            raw_text(lambda t: re.sub(r'("bytes": )\d+', rf"\g<1>{digits}", t, count=1)))
    variant("a std of 1e999 (infinity)", raw_text(lambda t: first_std(t, "1e999")))
    depth = 100_000
    variant("10**5-deep nested list",
            raw_text(lambda t: t[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"))
    variant("10**5-deep nested object",
            raw_text(lambda t: t[:-1] + ', "deep": ' + '{"a": ' * depth + "1" + "}" * depth + "}"))
    variant("invalid JSON: truncated", raw_text(lambda t: t[:len(t) // 2]))
    variant("invalid JSON: trailing garbage", raw_text(lambda t: t + "}}garbage"))
    variant("invalid JSON: NaN literal", raw_text(lambda t: first_std(t, "NaN")))
    variant("invalid UTF-8", raw_text(lambda t: t.replace(': "', ': "\xff', 1).encode("latin-1", "replace")))
    variant("empty manifest", raw_text(lambda t: b""))
    variant("duplicate key 'precision'", raw_text(lambda t: '{"precision": "int8", ' + t[1:]))

    def manifest_file(kind: str) -> Callable[[Path, Path], Path]:
        def make(d: Path, bundle: Path) -> Path:
            mf = bundle / "manifest.json"
            if kind == "missing":
                mf.unlink()
            elif kind == "dir":
                mf.unlink()
                mf.mkdir()
            elif kind == "symlink":
                shutil.move(mf, d / "outside.json")
                mf.symlink_to(d / "outside.json")
            elif kind == "huge":
                with mf.open("r+b") as f:
                    f.truncate(65 << 20)  # sparse: the size check must come before any read
            return bundle
        return make

    for kind in ("missing", "dir", "symlink", "huge"):
        variant(f"manifest.json {'over 64 MiB' if kind == 'huge' else kind}", manifest_file(kind))

    def artifact_name(name: str) -> Callable[[Path, Path], Path]:
        def make(d: Path, bundle: Path) -> Path:
            if name == "ABS":
                target = d / "outside.onnx"
            elif name == "../x":
                target = d / "x"
            else:
                target = bundle / name
                target.parent.mkdir(exist_ok=True)
            shutil.copy(bundle / "model.onnx", target)

            def point(m: dict[str, Any]) -> None:
                m["artifacts"]["onnx"]["file"] = str(target) if name == "ABS" else name
                m["artifacts"]["onnx"]["sha256"] = sha256_file(target)
            return edit_manifest(bundle, point)
        return make

    for name in ("../x", "ABS", "sub/x", ".hidden"):
        label = "an absolute path outside" if name == "ABS" else repr(name)
        variant(f"onnx artifact named {label}", artifact_name(name))

    def symlinked_onnx(d: Path, bundle: Path) -> Path:
        shutil.move(bundle / "model.onnx", d / "outside.onnx")
        (bundle / "model.onnx").symlink_to(d / "outside.onnx")
        rehash(bundle)
        return bundle

    def external_data(d: Path, bundle: Path) -> Path:
        import onnx

        model = onnx.load(str(bundle / "model.onnx"))
        onnx.save_model(model, str(bundle / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
        rehash(bundle)
        return bundle

    def onnx_changed(d: Path, bundle: Path) -> Path:
        onnx_file = bundle / "model.onnx"
        onnx_file.write_bytes(flip_bits(onnx_file.read_bytes(), [onnx_file.stat().st_size - 7]))
        return bundle

    def onnx_missing(d: Path, bundle: Path) -> Path:
        (bundle / "model.onnx").unlink()
        return bundle

    def same_file_twice(d: Path, bundle: Path) -> Path:
        return edit_manifest(bundle, lambda m: m["artifacts"]["heldout"].update(
            file="model.onnx", sha256=m["artifacts"]["onnx"]["sha256"]))

    variant("model.onnx a symlink out of the bundle", symlinked_onnx)
    variant("ONNX with external data (hash updated)", external_data)
    variant("model.onnx changed, hash not updated", onnx_changed)
    variant("model.onnx missing", onnx_missing)
    variant("two artifacts share model.onnx", same_file_twice)

    # consistent tampering: the manifest agrees with itself, not with the graph or the scene
    def bands(n: int) -> Callable[[dict[str, Any]], None]:
        def change(m: dict[str, Any]) -> None:
            m["input"]["scene_bands"] = m["preprocessing"]["in_bands"] = n
            for t in m["preprocessing"]["transforms"]:
                for k in ("mean", "std", "lo", "hi"):
                    if k in t:
                        t[k] = (t[k] * 2)[:n]
            if m["input"].get("wavelengths"):
                m["input"]["wavelengths"] = (m["input"]["wavelengths"] * 2)[:n]
        return change

    def classes(n: int) -> Callable[[dict[str, Any]], None]:
        def change(m: dict[str, Any]) -> None:
            m["classes"] = [{**m["classes"][0], "id": i + 1, "name": f"c{i + 1}"} for i in range(n)]
            m["model"]["config"]["num_classes"] = n
        return change

    def portable(m: dict[str, Any]) -> None:
        m["scan"], m["plugin"] = "portable", None
        m["opset"].pop("hsiedge", None)

    variant("input.bands = 7", edit(lambda m: m["input"].update(bands=7)))
    variant("input.scene_bands = 199", edit(lambda m: m["input"].update(scene_bands=199)))
    variant("199 scene bands, consistently", edit(bands(199)))
    variant("197 scene bands, consistently", edit(bands(197)))
    variant("precision int8 with a calibration entry", edit(lambda m: m.update(
        precision="int8", calibration={"method": "percentile", "samples": 2048})))
    variant("precision fp16", edit(lambda m: m.update(precision="fp16")))
    variant("scan portable, plugin removed", edit(portable))
    variant("9 classes, consistently", edit(classes(9)))
    variant("3 classes, consistently", edit(classes(3)))
    variant("preprocessing std has 197 values",
            edit(lambda m: m["preprocessing"]["transforms"][0].update(std=m["preprocessing"]["transforms"][0]
                                                                       ["std"][:-1])))
    variant("preprocessing std of 0",
            edit(lambda m: m["preprocessing"]["transforms"][0]["std"].__setitem__(0, 0)))
    variant("preprocessing of unknown kind", edit(lambda m: m["preprocessing"]["transforms"][0].update(
        kind="fourier")))
    variant("preprocessing band_select index 500", edit(lambda m: m["preprocessing"]["transforms"].append(
        {"kind": "band_select", "indices": [500] * m["input"]["bands"]})))
    variant("model.name mambahsi", edit(lambda m: m["model"].update(name="mambahsi")))
    variant("input.kind pixel", edit(lambda m: m["input"].update(kind="pixel", layout="NC", patch_size=0,
                                                                  padding=None)))
    variant("model.config.d_model = 10**9", edit(lambda m: m["model"]["config"].update(d_model=10**9)),
            isolate="crash")

    cases = []
    for name, make, bad, isolate in variants:
        for command in ("infer", "parity-check"):
            def prepare(d: Path, make: Callable[[Path, Path], Path] = make, command: str = command) -> Run:
                bundle = make(d, copy_bundle(b.bundle, d))
                return infer(b, d, b.scene, bundle=bundle) if command == "infer" else parity(b, bundle)
            cases.append(Case("manifests", f"{name} ({command})", prepare, bad=bad, isolate=isolate))

    def heldout_payload(d: Path) -> Run:
        bundle = copy_bundle(b.bundle, d)
        with (bundle / "heldout.npz").open("wb") as f:
            np.savez(f, pixels=np.array([Payload(d / "pwned")], dtype=object), allow_pickle=True)
        rehash(bundle, "heldout")
        run = parity(b, bundle, scene=SCENE_MAT)
        run.marker = d / "pwned"
        return run
    cases.append(Case("manifests", "heldout.npz with a pickle payload (parity-check)", heldout_payload))
    return cases


def signature_cases(b: Base, rng: random.Random) -> list[Case]:
    """`--trusted-key`: unsigned, foreign, changed-after-signing bundles; bad keys and signatures."""
    cases: list[Case] = []
    owner_pub = b.pub(b.owner)

    def add(name: str, prepare: Callable[[Path], Run], **kw: Any) -> None:
        cases.append(Case("signatures", name, prepare, **kw))

    def trusted(source: Path, key: Callable[[Path], Path] | None = None,
                change: Callable[[Path, Path], None] | None = None, command: str = "infer",
                env: bool = False) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            bundle = copy_bundle(source, d)
            if change is not None:
                change(d, bundle)
            k = key(d) if key else owner_pub
            extra = () if env else ("--trusted-key", str(k))
            run = infer(b, d, b.scene, *extra, bundle=bundle) if command == "infer" \
                else parity(b, bundle, *extra)
            run.inputs.append(k)
            if env:
                run.env = {"HSIEDGE_TRUSTED_KEY": str(k)}
            return run
        return prepare

    def signed_by_stranger(d: Path, bundle: Path) -> None:
        (bundle / "manifest.sig").unlink()
        cli(["sign", str(bundle), str(b.stranger)])

    def weights_changed(d: Path, bundle: Path) -> None:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(bundle / "model.onnx"))
        init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] += 1.0
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(model, str(bundle / "model.onnx"))
        rehash(bundle)

    def reserialised(d: Path, bundle: Path) -> None:
        write_manifest(bundle, read_manifest(bundle))  # same content, other bytes

    def created_changed(d: Path, bundle: Path) -> None:
        edit_manifest(bundle, lambda m: m.update(created="2030-01-01T00:00:00+00:00"))

    def sig(content: Callable[[Path], bytes] | str) -> Callable[[Path, Path], None]:
        def change(d: Path, bundle: Path) -> None:
            s = bundle / "manifest.sig"
            s.unlink()
            if content == "dir":
                s.mkdir()
            else:
                s.write_bytes(content(d))  # type: ignore[operator]
        return change

    def other_manifest_sig(d: Path) -> bytes:
        other = copy_bundle(b.bundle, d, "other")
        edit_manifest(other, lambda m: m.update(created="2030-01-01T00:00:00+00:00"))
        cli(["sign", str(other), str(b.owner)])
        return (other / "manifest.sig").read_bytes()

    def key_file(make: Callable[[Path], Any]) -> Callable[[Path], Path]:
        def key(d: Path) -> Path:
            path = d / "trusted.pub"
            make(path)
            return path
        return key

    def ec_key(path: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        pub = ec.generate_private_key(ec.SECP256R1()).public_key()
        path.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))

    add("unsigned bundle", trusted(b.bundle))
    add("unsigned bundle, key from $HSIEDGE_TRUSTED_KEY (parity-check)",
        trusted(b.bundle, command="parity-check", env=True))
    add("signed by another key", trusted(b.signed, change=signed_by_stranger))
    add("weights changed after signing (hashes updated)", trusted(b.signed, change=weights_changed))
    add("manifest changed after signing (created)", trusted(b.signed, change=created_changed))
    add("manifest re-serialised after signing", trusted(b.signed, change=reserialised))
    add("weights changed after signing (parity-check)",
        trusted(b.signed, change=weights_changed, command="parity-check"))
    add("private key given as trusted key", trusted(b.signed, key=lambda d: b.owner))
    add("garbage key file", trusted(b.signed, key=key_file(lambda p: p.write_bytes(rng.randbytes(300)))))
    add("empty key file", trusted(b.signed, key=key_file(lambda p: p.write_bytes(b""))))
    add("1 MiB key file", trusted(b.signed, key=key_file(lambda p: p.write_bytes(b"A" * (1 << 20)))))
    add("missing key file", trusted(b.signed, key=lambda d: d / "missing.pub"))
    add("key file is a directory", trusted(b.signed, key=key_file(Path.mkdir)))
    add("key file is a FIFO", trusted(b.signed, key=key_file(os.mkfifo)), isolate="hang")
    add("EC P-256 key, not Ed25519", trusted(b.signed, key=key_file(ec_key)))
    add("garbage manifest.sig", trusted(b.signed, change=sig(lambda d: rng.randbytes(64))))
    add("empty manifest.sig", trusted(b.signed, change=sig(lambda d: b"")))
    add("1 MiB manifest.sig", trusted(b.signed, change=sig(lambda d: b"\0" * (1 << 20))))
    add("manifest.sig is a directory", trusted(b.signed, change=sig("dir")))
    add("manifest.sig of another manifest", trusted(b.signed, change=sig(other_manifest_sig)))

    def sign_with(key: Callable[[Path], Path]) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            bundle, k = copy_bundle(b.bundle, d), key(d)
            return Run(["sign", str(bundle), str(k)], [bundle, k])
        return prepare

    add("sign with a public key", sign_with(lambda d: owner_pub))
    add("sign with a garbage key", sign_with(key_file(lambda p: p.write_bytes(rng.randbytes(200)))))

    def export_sign_garbage(d: Path) -> Run:
        key = d / "bad.key"
        key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
        run = export(b.ckpt, d, "--sign", str(key))
        run.inputs.append(key)
        return run
    add("export --sign with a garbage key", export_sign_garbage)
    return cases


def output_cases(b: Base, rng: random.Random) -> list[Case]:
    """Outputs that would overwrite inputs, or cannot be written."""
    cases: list[Case] = []

    def add(name: str, prepare: Callable[[Path], Run], **kw: Any) -> None:
        cases.append(Case("outputs", name, prepare, **kw))

    def scene_copy(d: Path, name: str = "scene.tif") -> Path:
        return Path(shutil.copy(b.scene, d / name))

    def over_scene(d: Path) -> Run:
        s = scene_copy(d)
        return infer(b, d, s, out=s)

    def link(kind: str) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            s, other = scene_copy(d), d / "link.tif"
            if kind == "symlink":
                other.symlink_to(s)
            else:
                os.link(s, other)
            run = infer(b, d, s, out=other)
            run.inputs.append(other)
            return run
        return prepare

    def probs_over_scene(d: Path) -> Run:
        s = scene_copy(d, "X.probs.tif")
        return infer(b, d, s, "--probs", out=d / "X.tif")

    def quicklook(target: str) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            s = scene_copy(d)
            ql = s if target == "scene" else d / "map.tif"
            return infer(b, d, s, "--quicklook", str(ql))
        return prepare

    def inside_bundle(d: Path) -> Run:
        bundle = copy_bundle(b.bundle, d)
        return infer(b, d, b.scene, bundle=bundle, out=bundle / "map.tif")

    def over_onnx(d: Path) -> Run:
        bundle = copy_bundle(b.bundle, d)
        return infer(b, d, b.scene, bundle=bundle, out=bundle / "model.onnx")

    def under_file(command: str) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            (d / "file").write_text("a regular file\n")
            out = d / "file" / ("m.tif" if command == "infer" else "m.pt" if command == "train" else "bundle")
            if command == "infer":
                run = infer(b, d, b.scene, out=out)
            elif command == "train":
                run = train(d, SCENE_MAT, LABELS_MAT, out=out)
            else:
                run = export(b.ckpt, d, out=out)
            run.inputs.append(d / "file")
            return run
        return prepare

    def out_is_dir(d: Path) -> Run:
        (d / "map.tif").mkdir()
        run = infer(b, d, b.scene, out=d / "map.tif")
        run.inputs.append(d / "map.tif")
        return run

    def train_over(which: str) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            scene = Path(shutil.copy(SCENE_MAT, d / "scene.mat"))
            labels = Path(shutil.copy(LABELS_MAT, d / "gt.mat"))
            return train(d, scene, labels, out=scene if which == "scene" else labels)
        return prepare

    def export_over_ckpt(d: Path) -> Run:
        ckpt = Path(shutil.copy(b.ckpt, d / "m.pt"))
        return export(ckpt, d, out=ckpt)

    def keygen_over(d: Path) -> Run:
        s = scene_copy(d)
        return Run(["keygen", str(s)], [s], [])

    def keygen_pub_over(d: Path) -> Run:
        s = scene_copy(d, "k.pub")
        return Run(["keygen", str(d / "k")], [s], [d / "k"])

    add("infer -o the scene", over_scene)
    add("infer -o a symlink to the scene", link("symlink"))
    add("infer -o a hard link to the scene", link("hard"))
    add("infer --probs over a scene named X.probs.tif", probs_over_scene)
    add("infer --quicklook the scene", quicklook("scene"))
    add("infer --quicklook equal to -o", quicklook("map"))
    add("infer -o inside the bundle", inside_bundle)
    add("infer -o the bundle's model.onnx", over_onnx)
    add("infer -o under a regular file", under_file("infer"))
    add("infer -o an existing directory", out_is_dir)
    add("train -o under a regular file", under_file("train"))
    add("train -o the scene", train_over("scene"))
    add("train -o the labels", train_over("labels"))
    add("export -o under a regular file", under_file("export"))
    add("export -o the checkpoint", export_over_ckpt)
    add("keygen over an existing file", keygen_over)
    add("keygen whose KEY.pub is an existing file", keygen_pub_over)
    return cases


def resume_cases(b: Base, rng: random.Random) -> list[Case]:
    """`--resume` of an interrupted run (stopped after 2 tiles of 10) with something changed."""
    cases: list[Case] = []

    def add(name: str, change: Callable[[Path, Path, Path], Run], bad: bool = True,
            interrupted: bool = True) -> None:
        def prepare(d: Path) -> Run:
            scene, out = Path(shutil.copy(b.scene, d / "scene.tif")), d / "map.tif"
            if interrupted:
                interrupt(b, scene, out)
            return change(d, scene, out)
        cases.append(Case("resume", name, prepare, bad=bad))

    def replaced_scene(d: Path, scene: Path, out: Path) -> Run:
        write_geotiff(scene, b.crop[::-1].copy())
        return infer(b, d, scene, "--tile", "10", "--resume", out=out)

    def with_args(*extra: str) -> Callable[[Path, Path, Path], Run]:
        def change(d: Path, scene: Path, out: Path) -> Run:
            return infer(b, d, scene, *extra, out=out)
        return change

    def other_bundle(d: Path, scene: Path, out: Path) -> Run:
        bundle = copy_bundle(b.bundle, d)
        edit_manifest(bundle, lambda m: m["preprocessing"]["transforms"][0]["mean"].__setitem__(
            0, m["preprocessing"]["transforms"][0]["mean"][0] + 1.0))
        return infer(b, d, scene, "--tile", "10", "--resume", bundle=bundle, out=out)

    def lock_held(d: Path, scene: Path, out: Path) -> Run:
        from hsiedge.infer.staging import RunLock

        lock = RunLock(out).acquire()
        run = infer(b, d, scene, out=out)
        run.cleanup = lock.release
        return run

    def journal(kind: str) -> Callable[[Path, Path, Path], Run]:
        def change(d: Path, scene: Path, out: Path) -> Run:
            j = out.with_name(f".{out.name}.journal")
            if kind == "garbage":
                j.write_bytes(rng.randbytes(256))
            elif kind == "symlink":
                j.unlink()
                j.symlink_to(scene)
            elif kind == "torn":
                j.write_bytes(j.read_bytes()[:-5])
            return infer(b, d, scene, "--tile", "10", "--resume", out=out)
        return change

    def staging(kind: str) -> Callable[[Path, Path, Path], Run]:
        def change(d: Path, scene: Path, out: Path) -> Run:
            s = out.with_name(f".{out.name}.classes.npy")
            if kind == "symlink":
                s.unlink()
                s.symlink_to(scene)
            elif kind == "truncated":
                s.write_bytes(s.read_bytes()[:100])
            elif kind == "missing":
                s.unlink()
            return infer(b, d, scene, "--tile", "10", "--resume", out=out)
        return change

    add("scene replaced by other content of the same size", replaced_scene)
    add("other --tile", with_args("--tile", "20", "--resume"))
    add("other bundle (preprocessing changed)", other_bundle)
    add("other --batch", with_args("--tile", "10", "--batch", "7", "--resume"))
    add("--probs added", with_args("--tile", "10", "--probs", "--resume"))
    add("other --runtime", with_args("--tile", "10", "--runtime", "onnxruntime", "--resume"))
    add("rerun without --resume", with_args("--tile", "10"))
    add("output's lock held by a live run", lock_held, interrupted=False)
    add("journal overwritten with garbage", journal("garbage"))
    add("journal a symlink to the scene", journal("symlink"))
    add("journal's last line torn", journal("torn"), bad=False)
    add("staging classes a symlink to the scene", staging("symlink"))
    add("staging classes truncated", staging("truncated"))
    add("staging classes missing", staging("missing"), bad=False)
    add("--resume with nothing interrupted", with_args("--tile", "10", "--resume"), bad=False,
        interrupted=False)
    return cases


def argument_cases(b: Base, rng: random.Random) -> list[Case]:
    """Options out of range or not among the choices, with real files so that a missed check runs."""
    cases: list[Case] = []

    def add(name: str, prepare: Callable[[Path], Run], **kw: Any) -> None:
        cases.append(Case("arguments", name, prepare, **kw))

    def infer_opts(*extra: str) -> Callable[[Path], Run]:
        return lambda d: infer(b, d, b.scene, *extra)

    def parity_opts(*extra: str) -> Callable[[Path], Run]:
        return lambda d: parity(b, b.bundle, *extra)

    def train_opts(*extra: str) -> Callable[[Path], Run]:
        return lambda d: train(d, SCENE_MAT, LABELS_MAT, *extra)

    def export_opts(*extra: str) -> Callable[[Path], Run]:
        return lambda d: export(b.ckpt, d, *extra)

    def engine_opts(*extra: str) -> Callable[[Path], Run]:
        def prepare(d: Path) -> Run:
            bundle = copy_bundle(b.bundle, d)
            return Run(["engine", str(bundle), *extra], [bundle])
        return prepare

    for opt, value in (("--overlap", "-1"), ("--memory", "nan"), ("--memory", "inf"), ("--memory", "0"),
                       ("--memory", "-1"), ("--batch", "0"), ("--tile", "-5"), ("--tile", "0"),
                       ("--runtime", "cuda")):
        add(f"infer {opt} {value}", infer_opts(opt, value))
    for name, opts, opt, value in (
            ("export", export_opts, "--precision", "fp64"), ("export", export_opts, "--scan", "loop"),
            ("export", export_opts, "--calib-method", "max"), ("engine", engine_opts, "--target", "cpu"),
            ("parity-check", parity_opts, "--runtime", "torch"),
            ("parity-check", parity_opts, "--min-agreement", "1.5"),
            ("parity-check", parity_opts, "--max-rel-l2", "nan"),
            ("parity-check", parity_opts, "--max-delta-oa", "-1"),
            ("train", train_opts, "--device", "tpu"), ("train", train_opts, "--epochs", "0"),
            ("train", train_opts, "--protocol", "per-class:-5"),
            ("train", train_opts, "--protocol", "ratio:2"),
            ("train", train_opts, "--option", "warp_drive=1")):
        add(f"{name} {opt} {value}", opts(opt, value))
    add("train --option d_model=1000000000", train_opts("--option", "d_model=1000000000"), isolate="crash")
    add("train --class-colours tree=#zzzzzz", train_opts("--class-colours", "tree=#zzzzzz"))
    add("train --class-names with 2 names for 4 classes", train_opts("--class-names", "a,b"))
    return cases


BUILDERS = {"scenes": scene_cases, "labels": label_cases, "checkpoints": checkpoint_cases,
            "manifests": manifest_cases, "signatures": signature_cases, "outputs": output_cases,
            "resume": resume_cases, "arguments": argument_cases}
