from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import stimg as si
import stimg.encoders  # noqa: F401


def _slide(h=900, w=1300):
    img = np.full((h, w, 3), 235, np.uint8)
    rng = np.random.default_rng(0)
    img[150:750, 200:1000] = np.clip(rng.normal((170, 80, 150), 20, (600, 800, 3)), 0, 255).astype(np.uint8)
    return img


class Mean(nn.Module):
    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_tiles_cover_tissue_only():
    img = _slide()
    tiles = si.pp.tile_image(img, 100, mpp=1.0, min_tissue=0.5)
    xy = tiles.obsm["spatial"]
    # tissue is x∈[200,1000), y∈[150,750) → only centres inside (±50 px) are kept
    assert tiles.n_obs > 20
    assert (xy[:, 0] > 150).all() and (xy[:, 0] < 1050).all() and (xy[:, 1] > 100).all() and (xy[:, 1] < 800).all()
    assert (tiles.obs["tissue_coverage"] >= 0.5).all()
    assert set(tiles.obs["library_id"]) == {"tiles"}
    sf = tiles.uns["spatial"]["tiles"]["scalefactors"]
    assert sf["microns_per_pixel"] == 1.0 and sf["spot_diameter_fullres"] == 100.0
    assert np.shares_memory(tiles.uns["spatial"]["tiles"]["images"]["fullres"], img)  # no copy
    allt = si.pp.tile_image(img, 100, mpp=1.0, min_tissue=0.0)
    assert allt.n_obs == 9 * 13 and tiles.n_obs < allt.n_obs
    half = si.pp.tile_image(img, 100, mpp=1.0, stride_um=50, min_tissue=0.0)
    assert half.n_obs == 17 * 25


def test_tiles_flow_through_embed_and_prediction():
    img = _slide()
    genes = ["g0", "g1"]
    tiles = si.pp.tile_image(img, 100, mpp=1.0, genes=genes)
    enc = si.encoders.get_encoder(Mean(), transform=lambda x: x.float())  # raw 0–255 colour statistics
    si.pp.embed(tiles, enc, patch_um=100, patch_px=32, progress=False, key_added="X_mean")
    emb = tiles.obsm["X_mean"]
    assert emb.shape == (tiles.n_obs, 6) and np.isfinite(emb).all()
    # the embedded patch is exactly the tile: mean colour of the first tile
    x0, y0 = (tiles.obsm["spatial"][0] - 50).astype(int)
    ref = img[y0:y0 + 100, x0:x0 + 100].reshape(-1, 3).mean(0)
    assert np.allclose(emb[0, :3], ref, atol=3)
    # a ridge trained elsewhere predicts on the tiles
    train = si.datasets.synthetic(40, 5, image=False, as_anndata=True)
    train.obsm["X_mean"] = np.random.default_rng(0).normal(size=(train.n_obs, 6))
    train.var_names = ["g0", "g1", "g2", "g3", "g4"]
    model = si.models.RidgeRegressor(n_components=4).fit(train, "X_mean", genes=genes)
    si.tl.predict_expression(tiles, model)
    assert np.isfinite(tiles.layers["si_pred"]).all()


def test_spatialdata_in_and_out():
    sdata = si.datasets.synthetic(16, 5, mpp=1.0)
    out = si.pp.tile_image(sdata, 150, mpp=1.0, min_tissue=0.0, library_id="wsi")
    assert "wsi" in out.shapes and "table" in out.tables and len(out.images) == 1
    t = out.tables["table"]
    assert t.n_obs == len(out.shapes["wsi"])
    feats = si.pp.embed(out, Mean(), patch_um=150, patch_px=16, progress=False, inplace=False)
    assert feats.shape == (t.n_obs, 6) and np.isfinite(feats).all()
    ad = si.pp.tile_image(_slide(), 100, mpp=1.0, as_spatialdata=True)
    assert type(ad).__name__ == "SpatialData"


def test_errors():
    img = _slide()
    with pytest.raises(ValueError, match="pass mpp="):
        si.pp.tile_image(img, 100)  # mpp is required unless the slide records it (si.io.read_wsi)
    with pytest.raises(ValueError, match="mpp"):
        si.pp.tile_image(img, 100, mpp=-1)
    with pytest.raises(ValueError, match="px"):
        si.pp.tile_image(img, 5000, mpp=1.0)
    with pytest.raises(ValueError, match="No tile"):
        si.pp.tile_image(np.full((500, 500, 3), 240, np.uint8), 100, mpp=1.0)
    with pytest.raises(ValueError, match="min_tissue"):
        si.pp.tile_image(img, 100, mpp=1.0, min_tissue=2)
