"""Scene readers and label maps on every real file, window reads, round trips, bad inputs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from hsiedge.io import SceneReadError, Window, open_scene, read_cube, read_labels

CUBES = [  # path, key, shape, dtype (as ../shared/datasets/README.md gives them)
    ("jasper_ridge/JasperRidge2_R198.mat", None, (100, 100, 198), np.uint16),
    ("abu/abu-airport-2.mat", None, (100, 100, 205), np.uint16),
    ("abu/abu-airport-3.mat", None, (100, 100, 205), np.int16),
    ("abu/abu-airport-4.mat", None, (100, 100, 191), np.uint16),
    ("abu/abu-beach-1.mat", None, (150, 150, 188), np.int16),
    ("abu/abu-beach-2.mat", None, (100, 100, 193), np.int16),
    ("abu/abu-beach-3.mat", None, (100, 100, 188), np.int16),
    ("abu/abu-urban-1.mat", None, (100, 100, 204), np.int16),
    ("abu/abu-urban-2.mat", None, (100, 100, 207), np.int16),
    ("abu/abu-urban-3.mat", None, (100, 100, 191), np.uint16),
    ("abu/abu-urban-4.mat", None, (100, 100, 205), np.int16),
    ("abu/abu-urban-5.mat", None, (100, 100, 205), np.int16),
    ("hydice_anomaly/hydice.mat", None, (80, 100, 162), np.uint16),
    ("aviris_santa_barbara/a_hsi_img_for_VI_demo.mat", None, (90, 90, 224), np.int16),
    ("pavia_university/paviaU_subimg.mat", None, (50, 50, 103), np.uint16),
    ("moffett/Moffett_vca.mat", "data", (50, 50, 189), np.float64),
    ("muufl_gulfport/an_hsi_image_sub_for_demo.mat", None, (51, 88, 72), np.float32),
    ("muufl_gulfport/an_hsi_img_for_class_demo.mat", None, (31, 20, 72), np.float32),
    ("muufl_gulfport/an_hsi_img_for_tgt_det_demo.mat", None, (36, 36, 72), np.float32),
    ("plantcv_corn_kernel/corn-kernel-hyperspectral.hdr", None, (31, 43, 580), np.uint16),
]

LABELS = [  # path, key, shape, largest class id, labeled pixels
    ("indian_pines/Indian_pines_gt.mat", None, (145, 145), 16, 10249),
    ("pavia_university/PaviaU_gt.mat", None, (610, 340), 9, 42776),
    ("salinas/Salinas_gt.mat", None, (512, 217), 16, 54129),
    ("salinas/SalinasA_gt.mat", None, (83, 86), 14, 5348),
    ("ksc/KSC_gt.mat", None, (512, 614), 13, 5211),
    ("ksc/gic_original/KSC_gt.mat", None, (512, 614), 13, 5211),
    ("botswana/Botswana_gt.mat", None, (1476, 256), 14, 3248),
    ("pavia_centre/paviaC_gt.mat", None, (1096, 715), 9, 148152),
    ("houston2013/houston_gt.mat", "houston_gt_tr", (349, 1905), 15, 2832),
    ("houston2013/houston_gt.mat", "houston_gt_te", (349, 1905), 15, 12197),
]


@pytest.mark.filterwarnings("ignore:.*byte order")
@pytest.mark.parametrize("rel,key,shape,dtype", CUBES, ids=[c[0].split("/")[-1] for c in CUBES])
def test_real_cubes(datasets, rel, key, shape, dtype):
    with open_scene(datasets / rel, key=key) as s:
        assert s.shape == shape and s.dtype == dtype
        full = s.read()
        assert full.shape == shape and full.dtype == dtype
        w = Window(3, 5, shape[0] // 2, shape[1] // 3)
        np.testing.assert_array_equal(s.read(w), full[3:3 + w.height, 5:5 + w.width])


def test_jasper_unfolds_like_the_dataset_readme(datasets, jasper_cube):
    np.testing.assert_array_equal(read_cube(datasets / "jasper_ridge" / "JasperRidge2_R198.mat"), jasper_cube)


def test_wavelengths_are_read(datasets):
    with open_scene(datasets / "aviris_santa_barbara" / "a_hsi_img_for_VI_demo.mat") as s:
        assert s.wavelengths.shape == (224,) and s.wavelengths[0] == pytest.approx(365.91, abs=1e-3)
    with pytest.warns(UserWarning, match="no 'byte order'"):
        s = open_scene(datasets / "plantcv_corn_kernel" / "corn-kernel-hyperspectral.hdr")
    assert s.wavelengths[0] == pytest.approx(366.551) and s.wavelengths[-1] == pytest.approx(1048.421)
    # Little-endian is right for this file: its spectra are smooth (README: checked by hand).
    spec = s.read(Window(15, 20, 1, 1)).ravel().astype(float)
    assert np.abs(np.diff(spec)).mean() < 0.1 * spec.mean()


@pytest.mark.parametrize("rel,key,shape,classes,labeled", LABELS,
                         ids=[f"{p.split('/')[-1]}-{k}" for p, k, *_ in LABELS])
def test_real_label_maps(datasets, rel, key, shape, classes, labeled):
    lm = read_labels(datasets / rel, key=key, shape=shape)
    assert lm.labels.shape == shape and lm.labels.dtype == np.uint8
    assert int((lm.labels > 0).sum()) == labeled and lm.num_classes == classes


def test_ksc_v73_equals_the_original_format(datasets):
    a = read_labels(datasets / "ksc" / "KSC_gt.mat").labels
    b = read_labels(datasets / "ksc" / "gic_original" / "KSC_gt.mat").labels
    np.testing.assert_array_equal(a, b)


def test_jasper_labels_from_abundances(datasets):
    lm = read_labels(datasets / "jasper_ridge" / "_EndJasperRidge2_R198.mat", shape=(100, 100))
    assert lm.class_names == ["tree", "water", "dirt", "road"]
    np.testing.assert_array_equal(np.bincount(lm.labels.ravel()), [0, 3493, 3326, 2428, 753])


# ---------------------------------------------------------------- round trips written by the tests

@pytest.fixture(scope="module")
def real_cube(datasets) -> np.ndarray:
    return read_cube(datasets / "pavia_university" / "paviaU_subimg.mat")[:37, :45, :20]


@pytest.mark.parametrize("interleave", ["pixel", "band"])
def test_geotiff_round_trip(tmp_path, real_cube, interleave):
    path = tmp_path / "scene.tif"
    transform = from_origin(532_000.0, 5_040_000.0, 1.3, 1.3)
    rows, cols, bands = real_cube.shape
    with rasterio.open(path, "w", driver="GTiff", height=rows, width=cols, count=bands, dtype="uint16",
                       crs=CRS.from_epsg(32632), transform=transform, nodata=0, tiled=True,
                       blockxsize=16, blockysize=16, interleave=interleave) as dst:
        dst.write(real_cube.transpose(2, 0, 1))
        wavelengths = ", ".join(str(430.0 + 4 * i) for i in range(bands))
        dst.update_tags(ns="ENVI", wavelength="{" + wavelengths + "}")
    with open_scene(path) as s:
        assert s.shape == real_cube.shape and s.dtype == np.uint16
        assert CRS.from_wkt(s.crs) == CRS.from_epsg(32632) and s.transform == tuple(transform)[:6]
        assert s.nodata == 0 and s.wavelengths[1] == pytest.approx(434.0)
        np.testing.assert_array_equal(s.read(), real_cube)
        np.testing.assert_array_equal(s.read(Window(10, 7, 20, 31)), real_cube[10:30, 7:38])


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("byte_order", [0, 1])
def test_envi_round_trip(tmp_path, real_cube, interleave, byte_order):
    rows, cols, bands = real_cube.shape
    order = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
    data = np.ascontiguousarray(real_cube.transpose(order)).astype(">u2" if byte_order else "<u2")
    (tmp_path / "s.raw").write_bytes(b"\0" * 64 + data.tobytes())
    (tmp_path / "s.hdr").write_text(
        f"ENVI\nsamples = {cols}\nlines = {rows}\nbands = {bands}\nheader offset = 64\ndata type = 12\n"
        f"interleave = {interleave}\nbyte order = {byte_order}\ndata ignore value = 65535\n"
        "map info = {UTM, 1, 1, 532000.0, 5040000.0, 1.3, 1.3, 32, North, WGS-84}\n"
        "wavelength = {" + ",\n ".join(f"{500 + i}.5" for i in range(bands)) + "}\n")
    with open_scene(tmp_path / "s.raw") as s:
        assert s.shape == real_cube.shape and s.nodata == 65535
        assert s.transform == (1.3, 0.0, 532000.0, 0.0, -1.3, 5040000.0)
        assert s.wavelengths[-1] == pytest.approx(500.5 + bands - 1)
        np.testing.assert_array_equal(s.read(), real_cube)
        np.testing.assert_array_equal(s.read(Window(5, 9, 13, 17)), real_cube[5:18, 9:26])


def test_envi_crs_from_map_info_alone(tmp_path, real_cube):
    rows, cols, bands = real_cube.shape
    real_cube.astype("<u2").tofile(tmp_path / "s.img")
    (tmp_path / "s.hdr").write_text(
        f"ENVI\nsamples = {cols}\nlines = {rows}\nbands = {bands}\ndata type = 12\ninterleave = bip\n"
        "byte order = 0\nmap info = {UTM, 1, 1, 560000, 4140000, 20, 20, 10, North, WGS-84}\n")
    with open_scene(tmp_path / "s.img") as s:
        assert CRS.from_wkt(s.crs).to_epsg() == 32610
        assert s.transform == (20.0, 0.0, 560000.0, 0.0, -20.0, 4140000.0)


def test_plantcv_cube_without_byte_order_reads_little_endian(datasets):
    """The real PlantCV header has no `byte order`: read as little-endian, with a warning."""
    hdr = datasets / "plantcv_corn_kernel" / "corn-kernel-hyperspectral.hdr"
    raw = hdr.with_suffix(".raw")
    with pytest.warns(UserWarning, match="no 'byte order'"), open_scene(raw) as s:
        cube = s.read()
    rows, cols, bands = 31, 43, 580  # from the header; BIL
    ref = np.fromfile(raw, dtype="<u2", count=rows * bands * cols).reshape(rows, bands, cols)
    ref = ref.transpose(0, 2, 1)
    assert cube.shape == (rows, cols, bands)
    np.testing.assert_array_equal(cube, ref)
    assert s.wavelengths[0] == pytest.approx(366.551)


def test_npy_and_hdf5_mat_round_trip(tmp_path, real_cube):
    np.save(tmp_path / "s.npy", real_cube)
    with open_scene(tmp_path / "s.npy") as s:
        np.testing.assert_array_equal(s.read(Window(1, 2, 3, 4)), real_cube[1:4, 2:6])
    with h5py.File(tmp_path / "s.mat", "w") as f:  # MATLAB v7.3 stores the transpose
        f["cube"] = real_cube.T
    with open_scene(tmp_path / "s.mat") as s:
        assert s.shape == real_cube.shape
        np.testing.assert_array_equal(s.read(), real_cube)
        np.testing.assert_array_equal(s.read(Window(20, 30, 17, 15)), real_cube[20:37, 30:45])


def test_label_raster_round_trip(tmp_path, datasets):
    gt = read_labels(datasets / "salinas" / "SalinasA_gt.mat").labels
    with rasterio.open(tmp_path / "gt.tif", "w", driver="GTiff", height=gt.shape[0], width=gt.shape[1],
                       count=1, dtype="uint8") as dst:
        dst.write(gt[None])
    np.testing.assert_array_equal(read_labels(tmp_path / "gt.tif").labels, gt)
    np.save(tmp_path / "gt.npy", gt)
    np.testing.assert_array_equal(read_labels(tmp_path / "gt.npy", shape=gt.shape).labels, gt)


# ------------------------------------------------------------------------------------- bad inputs

def _error(fn, *args, **kw) -> str:
    with pytest.raises(SceneReadError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_bad_inputs_get_one_sentence(tmp_path: Path, datasets, real_cube):
    assert "file not found" in _error(open_scene, tmp_path / "nope.tif")
    assert "found a directory" in _error(open_scene, tmp_path)
    cut = tmp_path / "cut.mat"
    cut.write_bytes((datasets / "pavia_university" / "paviaU_subimg.mat").read_bytes()[:3000])
    assert "cut.mat: expected a MATLAB .mat file" in _error(open_scene, cut)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\0" + bytes(range(256)) * 4)
    assert "junk.tif: expected a raster GDAL can read" in _error(open_scene, junk)
    gt = datasets / "indian_pines" / "Indian_pines_gt.mat"
    assert "expected a 3-D (rows, cols, bands) array, but the file looks like a label map" in _error(
        open_scene, gt)
    assert "found a 2-D array" in _error(open_scene, gt, key="indian_pines_gt")
    assert "found several" in _error(open_scene, datasets / "moffett" / "Moffett_vca.mat")
    np.save(tmp_path / "flat.npy", np.zeros((4, 5)))
    msg = _error(open_scene, tmp_path / "flat.npy")
    assert "expected a 3-D (rows, cols, bands) array, found shape (4, 5)" in msg
    # ENVI (GDAL's reasons): truncated data, unknown interleave, missing field, not a header
    (tmp_path / "e.raw").write_bytes(real_cube.astype("<u2").tobytes()[:1000])
    hdr = "ENVI\nsamples = 45\nlines = 37\nbands = 20\ndata type = 12\nbyte order = 0\ninterleave = {}\n"
    (tmp_path / "e.hdr").write_text(hdr.format("bip"))
    msg = _error(open_scene, tmp_path / "e.hdr")
    assert "e.raw: expected an ENVI raster described by e.hdr" in msg and "too small" in msg
    (tmp_path / "e.raw").write_bytes(bytes(45 * 37 * 20 * 2))
    (tmp_path / "e.hdr").write_text(hdr.format("zigzag"))
    assert "expected interleave bsq, bil or bip, found 'zigzag'" in _error(open_scene, tmp_path / "e.hdr")
    (tmp_path / "e.hdr").write_text("ENVI\nsamples = 45\nlines = 37\n")
    assert "bands keywords appears to be missing" in _error(open_scene, tmp_path / "e.hdr")
    (tmp_path / "e.hdr").write_text("samples = 45\n")
    assert "expected an ENVI header starting with 'ENVI'" in _error(open_scene, tmp_path / "e.raw")
    # labels: size mismatch, multi-band raster, window outside the scene
    msg = _error(read_labels, gt, shape=(100, 100))
    assert "label map is 145 x 145 but the scene is 100 x 100" in msg
    with open_scene(datasets / "pavia_university" / "paviaU_subimg.mat") as s:
        assert "outside the 50 x 50 scene" in _error(s.read, Window(40, 40, 20, 5))


def test_no_warning_when_byte_order_is_given(tmp_path, real_cube):
    rows, cols, bands = real_cube.shape
    real_cube.astype("<u2").tofile(tmp_path / "x.img")
    (tmp_path / "x.hdr").write_text(f"ENVI\nsamples = {cols}\nlines = {rows}\nbands = {bands}\n"
                                    "data type = 12\ninterleave = bip\nbyte order = 0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_cube(tmp_path / "x.hdr"), real_cube)


def test_urban_labels_from_abundances_with_their_own_size(datasets):
    """Urban's reference file carries nRow / nCol, so no scene is needed to unfold it."""
    lm = read_labels(datasets / "urban" / "_EndUrban_R162.mat")
    assert lm.labels.shape == (307, 307)
    np.testing.assert_array_equal(np.bincount(lm.labels.ravel()), [0, 29954, 32328, 24805, 7162])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc (Linux)")
def test_streamed_memory_mapped_reads_do_not_stay_resident(tmp_path, datasets):
    """A streamed ENVI scene is read through a memory map; the pages a window touched must not
    count as resident for the rest of the run (a 4 GB scene would look like 4 GB)."""
    pavia = read_cube(datasets / "pavia_university" / "paviaU_subimg.mat")  # (50, 50, 103)
    big = np.tile(pavia, (16, 16, 1))  # 800 x 800 x 103 uint16: 132 MB of real spectra, BIL
    (tmp_path / "s.raw").write_bytes(np.ascontiguousarray(big.transpose(0, 2, 1)).tobytes())
    (tmp_path / "s.hdr").write_text("ENVI\nsamples = 800\nlines = 800\nbands = 103\ndata type = 12\n"
                                    "interleave = bil\nbyte order = 0\n")
    del big

    def rss_file_mib() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    with open_scene(tmp_path / "s.raw") as s:
        before = rss_file_mib()
        for r in range(0, 800, 100):
            for c in range(0, 800, 100):
                w = s.read(Window(r, c, 100, 100))
        grown = rss_file_mib() - before
    np.testing.assert_array_equal(w, np.tile(pavia, (2, 2, 1)))  # the last window, (700, 700)
    assert grown < 20, f"{grown:.0f} MiB of the 132 MB scene stayed resident"


@pytest.mark.parametrize("value,mib", [("64", 64), ("128MB", 128), ("200000000", 200e6 / 2**20),
                                       ("junk", 64)])
def test_gdal_block_cache_size_is_read_as_gdal_reads_it(monkeypatch, value, mib):
    from hsiedge.io.raster import block_cache_mib

    monkeypatch.setenv("GDAL_CACHEMAX", value)
    assert block_cache_mib() == pytest.approx(mib)
    monkeypatch.setenv("GDAL_CACHEMAX", "10%")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert block_cache_mib() == pytest.approx(total / 10)


def test_swapped_scene_and_labels_say_what_each_file_looks_like(datasets):
    """A label or abundance file given as the scene, or a cube given as labels: the message says
    which it looks like and where it belongs (no --key could fix it)."""
    jasper = datasets / "jasper_ridge"
    with pytest.raises(SceneReadError, match=r"looks like reference abundances \(A, M\): pass it as --lab"):
        open_scene(jasper / "_EndJasperRidge2_R198.mat")
    with pytest.raises(SceneReadError, match="looks like a label map: pass it as --labels"):
        open_scene(datasets / "indian_pines" / "Indian_pines_gt.mat")
    with pytest.raises(SceneReadError, match="looks like a hyperspectral cube: pass it as --scene"):
        read_labels(jasper / "JasperRidge2_R198.mat")
    with pytest.raises(SceneReadError, match=r"without nRow / nCol: the scene's rows and columns are needed"):
        read_labels(jasper / "_EndJasperRidge2_R198.mat")  # no shape= given
    with pytest.raises(SceneReadError, match="matching the 100 x 99 scene, found"):
        read_labels(jasper / "_EndJasperRidge2_R198.mat", shape=(100, 99))
