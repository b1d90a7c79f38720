"""read_wsi on real SVS slides and generated TIFF/OME-TIFF pyramids; lazy tissue tiling on them."""

from __future__ import annotations

import importlib.util

import dask.array as da
import numpy as np
import pytest
import tifffile

import stimg as si

WSI = "wsi"


def _img(h=1024, w=1536):
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 235, np.uint8)
    img[200:800, 300:1200] = rng.normal((170, 80, 150), 20, (600, 900, 3)).clip(0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def ome_pyramid(tmp_path_factory):
    path = tmp_path_factory.mktemp("wsi") / "slide.ome.tif"
    img = _img()
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(img, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, **opts)
        tw.write(img[::2, ::2], subfiletype=1, **opts)
        tw.write(img[::4, ::4], subfiletype=1, **opts)
    return path, img


def test_ome_tiff_pyramid_is_lazy_multiscale_with_mpp(ome_pyramid):
    path, img = ome_pyramid
    sdata = si.io.read_wsi(path)
    meta = sdata.attrs["stimg_wsi"]
    assert meta["mpp"] == 0.5 and meta["mpp_source"] == "metadata" and meta["backend"] == "tiffslide"
    assert meta["level_shapes"] == [(1024, 1536), (512, 768), (256, 384)]
    from spatialdata import get_pyramid_levels

    levels = get_pyramid_levels(sdata.images["slide.ome"])
    assert [lv.shape for lv in levels] == [(3, 1024, 1536), (3, 512, 768), (3, 256, 384)]
    assert all(isinstance(lv.data, da.Array) for lv in levels)  # nothing read yet
    assert np.array_equal(levels[0].data[:, 300:310, 400:420].compute(), np.moveaxis(img[300:310, 400:420], -1, 0))


def test_tiles_of_a_pyramid_cover_tissue_only_and_reference_the_slide(ome_pyramid):
    path, _ = ome_pyramid
    sdata = si.io.read_wsi(path)
    tiles = si.pp.tile_image(sdata, 100, genes=["g0", "g1"])
    table = tiles.tables["table"]
    xy = table.obsm["spatial"]
    # tissue is x∈[300,1200), y∈[200,800) px; tiles are 200 px: centres lie inside it (± half a tile)
    assert 10 <= table.n_obs <= 16
    assert (xy[:, 0] > 200).all() and (xy[:, 0] < 1300).all() and (xy[:, 1] > 100).all() and (xy[:, 1] < 900).all()
    assert (table.obs["tissue_coverage"] >= 0.5).all()
    assert tiles.images["slide.ome"] is sdata.images["slide.ome"]  # same lazy element, no copy
    assert table.uns["spatial"]["tiles"]["scalefactors"]["microns_per_pixel"] == 0.5
    assert list(table.var_names) == ["g0", "g1"]


def test_generic_tiff_resolution_and_missing_mpp(tmp_path):
    img = _img()[:512, :512]
    with_res = tmp_path / "res.tif"
    tifffile.imwrite(with_res, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    assert si.io.read_wsi(with_res).attrs["stimg_wsi"]["mpp"] == pytest.approx(0.5)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, img, tile=(256, 256), photometric="rgb")
    with pytest.raises(ValueError, match="no pixel size.*mpp="):
        si.io.read_wsi(bare)
    assert si.io.read_wsi(bare, mpp=0.25).attrs["stimg_wsi"]["mpp_source"] == "argument"
    with pytest.raises(ValueError, match="mpp must be a positive"):
        si.io.read_wsi(bare, mpp=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        si.io.read_wsi(tmp_path / "nope.svs")
    (tmp_path / "junk.svs").write_bytes(b"not a slide")
    with pytest.raises(ValueError, match="Could not read"):
        si.io.read_wsi(tmp_path / "junk.svs", backend="tiffslide")
    with pytest.raises(ValueError, match="unknown"):
        si.pp.tile_image(si.io.read_wsi(bare, mpp=0.5).images["bare"].data, 100)  # array without mpp


@pytest.mark.real
def test_real_svs_slides(datadir):
    cmu = si.io.read_wsi(datadir / WSI / "CMU-1-Small-Region.svs")
    meta = cmu.attrs["stimg_wsi"]
    assert meta["mpp"] == pytest.approx(0.499) and meta["vendor"] == "aperio"
    assert meta["level_shapes"] == [(2967, 2220)]
    tcga = datadir / WSI / "tcga-cr-7395-01a-01-ts1.svs"  # JPEG 2000 tiles, 2 levels, no µm/px
    with pytest.raises(ValueError, match=r"records no pixel size.*mpp="):
        si.io.read_wsi(tcga)
    sd = si.io.read_wsi(tcga, mpp=0.5)
    assert sd.attrs["stimg_wsi"]["level_shapes"] == [(3567, 4443), (1783, 2221)]
    tiles = si.pp.tile_image(sd, 112)
    t = tiles.tables["table"]
    assert 100 < t.n_obs < t.uns["tile_image"]["params"]["n_tiles_grid"]  # background tiles dropped
    assert (t.obs["tissue_coverage"] >= 0.5).all()


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("openslide") is None, reason="openslide-python not installed")
def test_openslide_backend_reads_the_same_pixels(datadir):
    path = datadir / WSI / "CMU-1-Small-Region.svs"
    a = si.io.read_wsi(path, backend="tiffslide").images["CMU-1-Small-Region"].data[:, 1000:1040, 700:760]
    b = si.io.read_wsi(path, backend="openslide").images["CMU-1-Small-Region"].data[:, 1000:1040, 700:760]
    assert np.abs(a.compute().astype(int) - b.compute().astype(int)).mean() < 2  # same JPEG tiles, two decoders
