"""si.pp.embed_grid: grid features equal per-unit features where units sit on nodes; interpolation is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import stimg as si


class _MeanRGB(nn.Module):
    """A tiny deterministic encoder: mean colour of each quadrant (12 features)."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        q = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        return torch.cat([p.float().mean((-2, -1)) for p in q], 1)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_units_on_nodes_get_their_own_patch_features(interpolation):
    sd = si.datasets.synthetic(16, 5, mpp=1.0)  # spots every 200 µm, on a 100 µm grid's nodes
    enc = _MeanRGB()
    kw = {"patch_px": 16, "accelerator": "cpu", "cache": False, "progress": False}
    si.pp.embed(sd, enc, patch_um=112, key_added="X_unit", **kw)
    si.pp.embed_grid(sd, enc, stride_um=100, patch_um=112, interpolation=interpolation, key_added="X_grid", **kw)
    t = sd.tables["table"]
    np.testing.assert_allclose(t.obsm["X_grid"], t.obsm["X_unit"], rtol=1e-5, atol=1e-5)
    p = t.uns["X_grid"]["params"]
    assert p["n_patches"] == 16 and p["grid_stride_um"] == 100 and p["interpolation"] == interpolation


def test_bilinear_blends_the_four_nodes():
    sd = si.datasets.synthetic(16, 5, mpp=1.0)
    t = sd.tables["table"]
    enc = _MeanRGB()
    kw = {"patch_px": 16, "accelerator": "cpu", "cache": False, "progress": False}
    # a unit between nodes: features are the bilinear mix of the 4 node patches
    grid = si.pp.embed_grid(sd, enc, stride_um=200, patch_um=224, interpolation="nearest", inplace=False, **kw)
    circ = sd.shapes["S0"]
    shifted = circ.copy()
    shifted.geometry = shifted.geometry.translate(-150, -100)  # fx = 0.25, fy = 0.5 of a 200 µm cell
    sd.shapes["S0"] = shifted
    out = si.pp.embed_grid(sd, enc, stride_um=200, patch_um=224, interpolation="bilinear", inplace=False, **kw)
    xy = t.obsm["spatial"]
    lut = {tuple(np.rint(v).astype(int)): g for v, g in zip(xy, grid, strict=True)}
    i = int(np.flatnonzero((xy[:, 0] == 400) & (xy[:, 1] == 400))[0])  # now at (250, 300)
    f00, f10 = lut[(200, 200)], lut[(400, 200)]
    f01, f11 = lut[(200, 400)], lut[(400, 400)]
    want = 0.75 * 0.5 * f00 + 0.25 * 0.5 * f10 + 0.75 * 0.5 * f01 + 0.25 * 0.5 * f11
    np.testing.assert_allclose(out[i], want, rtol=1e-5)


def test_embed_grid_errors():
    sd = si.datasets.synthetic(4, 5, mpp=1.0)
    with pytest.raises(ValueError, match="stride_um must be in"):
        si.pp.embed_grid(sd, _MeanRGB(), stride_um=500, patch_um=112)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        si.pp.embed_grid(sd, _MeanRGB(), interpolation="cubic")
    assert "X_MeanRGB" not in sd.tables["table"].obsm


def test_nodes_beyond_the_image_edge_are_moved_onto_it():
    # 8 µm bins up to the image edge: the node one stride beyond the last bins lies off the image
    sd = si.datasets.synthetic(40 * 40, 5, pitch_um=8, spot_diameter_um=8, mpp=1.0, seed=0)
    t = sd.tables["table"]
    img = sd.images["S0_full_image"]
    h, w = (img["scale0"]["image"] if hasattr(img, "keys") else img).shape[1:]
    stride = 56.0
    assert (np.ceil(t.obsm["spatial"].max(0) / stride) * stride >= [w, h]).any()  # some node falls off the image
    kw = {"patch_px": 16, "accelerator": "cpu", "cache": False, "progress": False}
    si.pp.embed_grid(sd, _MeanRGB(), stride_um=stride, patch_um=112, key_added="X_grid", **kw)
    f = t.obsm["X_grid"]
    assert f.shape == (t.n_obs, 12) and np.isfinite(f).all()
