"""Regression tests for the malformed inputs of issue 14, item 1 (one test per finding)."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pandas as pd
import pytest

import stimg as si
from stimg._utils import StimgWarning

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore::UserWarning:scvi")


@pytest.fixture
def adata():
    return si.datasets.synthetic(16, 5, as_anndata=True, mpp=4.0)


def _patch(data, **kw) -> np.ndarray:
    return si.pp.extract_patches(data, patch_px=32, **kw)[5].numpy()


def _set_image(a, img):
    lib = next(iter(a.uns["spatial"]))
    a.uns["spatial"][lib]["images"]["hires"] = img
    return a


@pytest.mark.parametrize("kind", ["float01", "float255", "uint16", "uint16_8bit", "rgba_opaque"])
def test_images_of_other_dtypes_and_alpha_give_the_same_patches(adata, kind):
    lib = next(iter(adata.uns["spatial"]))
    img8 = adata.uns["spatial"][lib]["images"]["hires"]
    want = _patch(adata)
    conv = {
        "float01": lambda x: x.astype(np.float32) / 255,  # scanpy's read_visium layout: used to give black patches
        "float255": lambda x: x.astype(np.float64),
        "uint16": lambda x: x.astype(np.uint16) * 257,
        "uint16_8bit": lambda x: x.astype(np.uint16),
        "rgba_opaque": lambda x: np.dstack([x, np.full(x.shape[:2], 255, np.uint8)]),
    }[kind]
    np.testing.assert_array_equal(_patch(_set_image(adata.copy(), conv(img8))), want)


def test_rgba_is_composited_over_white_and_grayscale_warns(adata):
    lib = next(iter(adata.uns["spatial"]))
    img8 = adata.uns["spatial"][lib]["images"]["hires"]
    clear = np.dstack([np.zeros_like(img8), np.zeros(img8.shape[:2], np.uint8)])  # transparent black
    assert (_patch(_set_image(adata.copy(), clear)) == 255).all()  # glass, not black
    grey = img8.mean(-1).astype(np.uint8)
    with pytest.warns(StimgWarning, match="grayscale"):
        p = _patch(_set_image(adata.copy(), grey))
    assert p.shape == (3, 32, 32) and (p[0] == p[1]).all() and (p[1] == p[2]).all()


def test_spatialdata_float_image_is_converted_lazily():
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    sd = si.datasets.synthetic(16, 5, mpp=4.0)
    want = _patch(sd)
    key = next(iter(sd.images))
    img = sd.images[key]
    sd.images[key] = Image2DModel.parse(img.data.astype("float32") / 255, dims=("c", "y", "x"),
                                        transformations=get_transformation(img, get_all=True))
    from stimg._spatial import sections

    assert type(sections(sd)[0].image_array()).__module__.startswith("dask")  # still lazy
    np.testing.assert_array_equal(_patch(sd), want)


@pytest.mark.parametrize(("img", "match"), [
    (np.zeros((40, 40, 2), np.uint8), "2 channels"),
    (np.full((40, 40, 3), 300.0), "rescale it to"),
    (np.full((40, 40, 3), np.nan), "NaN/inf"),
    (np.zeros((40, 40, 3), bool), "dtype bool"),
])
def test_unusable_images_are_refused_with_the_fix(adata, img, match):
    bad = _set_image(adata.copy(), img)
    with pytest.raises((ValueError, TypeError), match=match):
        si.pp.extract_patches(bad)


def test_synthetic_image_memory_is_about_the_image():
    import tracemalloc

    si.datasets.synthetic(4, 3)  # warm imports outside the measurement
    tracemalloc.start()
    try:
        si.datasets.synthetic(100, 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    image_bytes = (11 * 200) ** 2 * 3
    assert peak < 2.5 * image_bytes  # was 7.0×


def test_nan_coordinates_are_named(adata):
    bad = adata.copy()
    bad.obsm["spatial"][[2, 7]] = np.nan
    for call in (si.pp.extract_patches, si.pp.tissue_coverage, si.pp.embed):
        with pytest.raises(ValueError, match=r"2 of 16 spots .* non-finite .*coordinates.*np.isfinite"):
            call(bad)
    assert "tissue_coverage" not in bad.obs


def test_predicting_on_zero_spots(adata):
    model = si.models.RidgeRegressor(n_components=2, alpha=1.0).fit(adata, "X_synthetic", genes=adata.var_names[:2])
    empty = adata[:0].copy()
    assert model.predict(empty).mean.shape == (0, 2)  # the model answers an empty table with nothing
    with pytest.raises(ValueError, match="no spots.*nothing to predict"):
        si.tl.predict_expression(empty, model)


def test_truncated_model_file_names_the_file(adata, tmp_path):
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    m = si.models.NBRegressor(adata, n_hidden=4)
    m.train(max_epochs=1, accelerator="cpu", early_stopping=False, validation_size=0)
    path = m.save(tmp_path / "nb.stimg")
    cut = tmp_path / "cut.stimg"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut.stimg.*truncated, corrupt"):
        si.models.NBRegressor.load(cut)


def _her2st_files(datadir, section="C2"):
    root = datadir / "her2st"
    return root / "counts" / f"{section}.tsv.gz", root / "spots" / f"{section}_selection.tsv"


def test_truncated_gz_names_the_file(datadir, tmp_path):
    counts, spots = _her2st_files(datadir)
    cut = tmp_path / "C2.tsv.gz"
    cut.write_bytes(counts.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"C2.tsv.gz.*truncated or corrupt"):
        si.io.read_legacy_st(cut, spots, as_anndata=True)


def test_legacy_st_warns_when_many_spots_are_dropped(datadir, tmp_path):
    counts, spots = _her2st_files(datadir)
    with gzip.open(counts, "rt") as fh:
        df = pd.read_csv(fh, sep="\t", index_col=0)
    df.index = [f"{i}_shifted" if k % 3 else i for k, i in enumerate(df.index)]  # 2/3 of ids no longer match
    with pytest.warns(StimgWarning, match=r"kept 63 spots; dropped 124 of 187 count rows"):
        a = si.io.read_legacy_st(df, spots, as_anndata=True)
    assert a.n_obs == 63
    with warnings.catch_warnings():
        warnings.simplefilter("error", StimgWarning)  # the real files drop 0 of 187: no warning
        si.io.read_legacy_st(counts, spots, as_anndata=True)


def test_her2st_section_type_and_missing_image(datadir):
    with pytest.raises(TypeError, match=r"section name such as 'C2'.*got 2 \(int\).*Known sections: A1"):
        si.datasets.her2st(2)
    with pytest.warns(StimgWarning, match=r"\['A3'\] have no public H&E image.*image=False"):
        a = si.datasets.her2st("A3", as_anndata=True, extras=False)
    assert a.uns["spatial"]["A3"]["images"] == {}


def test_duplicate_obs_names_warn(adata):
    dup = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning
        dup.obs_names = ["s"] * 8 + [f"t{i}" for i in range(8)]
    with pytest.warns(StimgWarning, match=r"1 spot names .*obs_names_make_unique"):
        si.pp.tissue_coverage(dup)
    assert "tissue_coverage" in dup.obs  # works by position


def test_patch_um_huge_is_refused_before_allocating(adata):
    with pytest.raises(ValueError, match=r"patch_um=1e\+06 µm is a window of 250000 px .*GB per patch"):
        si.pp.extract_patches(adata, patch_um=1e6)
    with pytest.raises(ValueError, match="patch_um=1e"):
        si.pp.embed(adata, model=_tiny(), patch_um=1e6, patch_px=16)
    assert "X_Sequential" not in adata.obsm


def _tiny():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_cli_without_command_exits_nonzero(capsys):
    from stimg.cli import main

    assert main([]) == 2  # the console script exits with main()'s value
    err = capsys.readouterr().err
    assert "a command is required" in err and "demo" in err
