"""`.mat` cube reading on the real files, and its one-sentence errors."""

from __future__ import annotations

import numpy as np
import pytest

from hsiedge.io import SceneReadError, read_mat_cube


def test_jasper_unmixing_layout(datasets, jasper_cube):
    cube = read_mat_cube(datasets / "jasper_ridge" / "JasperRidge2_R198.mat")
    assert cube.shape == (100, 100, 198) and cube.dtype == np.uint16
    np.testing.assert_array_equal(cube, jasper_cube)


@pytest.mark.parametrize("rel,shape,dtype", [
    ("abu/abu-airport-2.mat", (100, 100, 205), np.uint16),
    ("abu/abu-beach-1.mat", (150, 150, 188), np.int16),
    ("aviris_santa_barbara/a_hsi_img_for_VI_demo.mat", (90, 90, 224), np.int16),
    ("pavia_university/paviaU_subimg.mat", (50, 50, 103), np.uint16),
    ("hydice_anomaly/hydice.mat", (80, 100, 162), np.uint16),
    ("moffett/Moffett_vca.mat", None, None),  # two 3-D arrays: needs a key
])
def test_real_cubes(datasets, rel, shape, dtype):
    if shape is None:
        with pytest.raises(SceneReadError, match="several"):
            read_mat_cube(datasets / rel)
        assert read_mat_cube(datasets / rel, key="data").shape == (50, 50, 189)
        return
    cube = read_mat_cube(datasets / rel)
    assert cube.shape == shape and cube.dtype == dtype


def test_errors_name_the_file(datasets, tmp_path):
    with pytest.raises(SceneReadError, match="file not found"):
        read_mat_cube(tmp_path / "missing.mat")
    gt = datasets / "indian_pines" / "Indian_pines_gt.mat"
    with pytest.raises(SceneReadError, match=r"Indian_pines_gt.mat: expected one 3-D"):
        read_mat_cube(gt)
    with pytest.raises(SceneReadError, match="expected an array named 'nope'"):
        read_mat_cube(gt, key="nope")
    with pytest.raises(SceneReadError, match="found a 2-D array"):
        read_mat_cube(gt, key="indian_pines_gt")
    truncated = tmp_path / "cut.mat"
    truncated.write_bytes((datasets / "pavia_university" / "paviaU_subimg.mat").read_bytes()[:3000])
    with pytest.raises(SceneReadError, match=r"cut\.mat: expected a MATLAB \.mat file"):
        read_mat_cube(truncated)
