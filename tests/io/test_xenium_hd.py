"""Xenium and Visium HD readers on the real fixtures (shapes, µm/px, counts, image levels)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import stimg as si
from stimg._spatial import sections


@pytest.fixture(scope="module")
def xenium_dir(datadir):
    return datadir / "fixtures" / "xenium_mouse_ileum_tiny"


@pytest.fixture(scope="module")
def hd_dir(datadir):
    return datadir / "fixtures" / "visium_hd_square_002um_toy"


def test_read_xenium(xenium_dir):
    import scanpy as sc

    sd = si.io.read_xenium(xenium_dir)
    t = sd.tables["table"]
    cells = pd.read_parquet(xenium_dir / "cells.parquet")
    raw = sc.read_10x_h5(xenium_dir / "cell_feature_matrix.h5")
    assert t.shape == (36, 5006) == (len(cells), raw.n_vars)
    assert float(t.X.sum()) == float(raw.X.sum()) > 0
    np.testing.assert_allclose(t.obsm["spatial"], cells.set_index("cell_id").loc[t.obs_names, ["x_centroid", "y_centroid"]])
    sf = t.uns["spatial"]["region"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(0.2125)
    # circles: area-equivalent radius in µm
    circ = sd.shapes["region"]
    np.testing.assert_allclose(np.pi * circ["radius"].to_numpy() ** 2, t.obs["cell_area"].to_numpy(), rtol=1e-6)
    assert set(sd.shapes) == {"region", "region_cell_boundaries", "region_nucleus_boundaries"}
    assert len(sd.shapes["region_nucleus_boundaries"]) == 23
    tx = sd.points["region_transcripts"]
    assert len(tx) == 1985
    # lazy multiscale morphology with the file's 5 levels, 4 channels
    img = sd.images["region_morphology_focus"]
    levels = list(img.keys())
    assert len(levels) == 5
    assert img["scale0"]["image"].shape == (4, 3522, 5789)
    assert type(img["scale0"]["image"].data).__module__.startswith("dask")
    # the section view: centres in morphology pixels, µm/px consistent
    sec = sections(sd, need_image=True)[0]
    assert sec.mpp == pytest.approx(0.2125)
    np.testing.assert_allclose(sec.xy, t.obsm["spatial"] / 0.2125)


def test_read_xenium_errors(tmp_path, xenium_dir):
    with pytest.raises(FileNotFoundError, match="experiment.xenium"):
        si.io.read_xenium(tmp_path)
    (tmp_path / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    with pytest.raises(FileNotFoundError, match="cells.parquet"):
        si.io.read_xenium(tmp_path)
    with pytest.raises(ValueError, match="he_alignment"):
        si.io.read_xenium(xenium_dir, he_image=xenium_dir / "x.tif")


def test_read_visium_hd(hd_dir):
    sd = si.io.read_visium_hd(hd_dir)
    assert list(sd.tables) == ["square_002um"]
    t = sd.tables["square_002um"]
    assert t.shape == (10, 10)
    name = "visium_hd_square_002um_toy_square_002um"
    sf = t.uns["spatial"][name]["scalefactors"]
    assert sf["bin_size_um"] == 2.0 and sf["microns_per_pixel"] == pytest.approx(0.2738242950835738)
    pos = pd.read_parquet(hd_dir / "binned_outputs/square_002um/spatial/tissue_positions.parquet").set_index("barcode")
    np.testing.assert_allclose(t.obsm["spatial"], pos.loc[t.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]])
    # a 2 µm bin is 2 / 0.2738 px wide
    np.testing.assert_allclose(sd.shapes[name]["radius"], 1.0 / sf["microns_per_pixel"])
    sec = sections(sd, table_key="square_002um")[0]
    assert sec.image_key.endswith("lowres_image")
    assert sec.mpp == pytest.approx(0.2738242950835738 / 0.02505533)  # µm per lowres pixel
    # one bin folder works too, and an absent bin size is named
    sd1 = si.io.read_visium_hd(hd_dir / "binned_outputs" / "square_002um", dataset_id="toy")
    assert "toy_square_002um" in sd1.shapes
    with pytest.raises(ValueError, match=r"bin sizes \[8\] µm not found; available: \[2\]"):
        si.io.read_visium_hd(hd_dir, bin_size=8)
    with pytest.raises(FileNotFoundError, match="square_XXXum"):
        si.io.read_visium_hd(hd_dir / "binned_outputs" / "square_002um" / "spatial")
