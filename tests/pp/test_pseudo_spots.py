"""si.pp.pseudo_spots: known-answer aggregation, sections kept apart, links, errors that write nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import stimg as si


def _bins(n_side=40, bin_um=8.0, n_sections=2, seed=0):
    """A square grid of 8 µm bins per section, in pixels of 0.5 µm."""
    rng = np.random.default_rng(seed)
    tabs = []
    for s in range(n_sections):
        ij = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2)
        a = AnnData(sp.csr_matrix(rng.poisson(1.0, (len(ij), 6)).astype(np.float32)))
        a.obs_names = [f"S{s}_{i}" for i in range(len(ij))]
        a.var_names = [f"g{j}" for j in range(6)]
        a.obsm["spatial"] = (ij + 0.5) * bin_um / 0.5
        a.obs["library_id"] = f"S{s}"
        a.obs["ct"] = pd.Categorical(rng.choice(["T", "B", "tumour"], len(ij)))
        tabs.append(a)
    import anndata as ad

    a = ad.concat(tabs)
    a.obs["library_id"] = a.obs["library_id"].astype("category")
    a.uns["spatial"] = {f"S{s}": {"scalefactors": {"microns_per_pixel": 0.5}} for s in range(n_sections)}
    return a


def test_square_known_answer():
    a = _bins()
    out = si.pp.pseudo_spots(a, 80.0, shape="square", labels_key="ct")
    # 40 bins of 8 µm = 320 µm per side → 4 × 4 squares of 80 µm, 100 bins each, per section
    assert out.n_obs == 2 * 16
    assert (out.obs["n_units"] == 100).all()
    np.testing.assert_allclose(out.X.sum(0), a.X.sum(0))
    for lib in ("S0", "S1"):  # counts never cross sections
        m, mo = a.obs["library_id"] == lib, out.obs["library_id"] == lib
        np.testing.assert_allclose(out[mo.to_numpy()].X.sum(0), a[m.to_numpy()].X.sum(0))
    # link back: members of one pseudo-spot sum to it
    name = out.obs_names[5]
    members = a.obs["pseudo_square_80um"] == name
    assert members.sum() == 100
    np.testing.assert_allclose(np.asarray(a[members.to_numpy()].X.sum(0)).ravel(), out[name].X.toarray().ravel())
    fr = out.obsm["ct_fractions"]
    np.testing.assert_allclose(fr.sum(1), 1.0)
    exp = a[members.to_numpy()].obs["ct"].value_counts(normalize=True)
    assert fr.loc[name, "tumour"] == pytest.approx(exp["tumour"])
    # centres in the source pixel frame, diameter in µm recorded
    assert out.uns["spatial"]["S0"]["scalefactors"]["spot_diameter_um"] == 80.0
    np.testing.assert_allclose(np.sort(np.unique(out.obsm["spatial"][:, 0])), (np.arange(4) + 0.5) * 160)


def test_hex_assigns_nearest_lattice_centre():
    a = _bins(n_side=60, n_sections=1)
    out = si.pp.pseudo_spots(a, 55.0, shape="hex", min_units=1)
    np.testing.assert_allclose(out.X.sum(), a.X.sum())
    xy_um = a.obsm["spatial"] * 0.5
    # every bin belongs to the hexagon (Voronoi cell of the triangular lattice) whose centre is nearest
    h = 55.0 * np.sqrt(3) / 2
    rows = np.arange(-1, int(xy_um[:, 1].max() / h) + 2)
    lattice = np.array([[c * 55.0 + (r % 2) * 27.5, r * h] for r in rows for c in range(-1, int(xy_um[:, 0].max() / 55) + 2)])
    from scipy.spatial import cKDTree

    _, near = cKDTree(lattice).query(xy_um)
    groups = a.obs["pseudo_hex_55um"].astype(str).to_numpy()
    for g in np.unique(groups)[:50]:
        assert len(np.unique(near[groups == g])) == 1  # one lattice cell per pseudo-spot
    assert len(np.unique(near)) == out.n_obs
    centres_um = out.obsm["spatial"] * 0.5
    # full interior cells are centred on the lattice, 55 µm apart
    full = out.obs["n_units"].to_numpy() == np.median(out.obs["n_units"])
    dd, _ = cKDTree(centres_um[full]).query(centres_um[full], k=2)
    assert np.median(dd[:, 1]) == pytest.approx(55.0, rel=0.05)


def test_min_units_and_errors_write_nothing():
    a = _bins(n_side=10, n_sections=1)
    before = a.copy()
    for kwargs, err, match in [
        ({"size_um": -1}, ValueError, "positive"),
        ({"size_um": 50, "shape": "circle"}, ValueError, "shape must be one of"),
        ({"size_um": 50, "labels_key": "nope"}, KeyError, "'nope' not found"),
        ({"size_um": 50, "min_units": 10_000}, ValueError, "No pseudo-spot has"),
        ({"size_um": 50, "layer": "counts"}, KeyError, "'counts' not found"),
    ]:
        with pytest.raises(err, match=match):
            si.pp.pseudo_spots(a, **kwargs)
        assert list(a.obs.columns) == list(before.obs.columns)
    a.obs["pseudo_square_40um"] = "mine"
    with pytest.raises(ValueError, match="overwrite=True"):
        si.pp.pseudo_spots(a, 40)
    assert (a.obs["pseudo_square_40um"] == "mine").all()
    neg = _bins(n_side=4, n_sections=1)
    neg.X = neg.X.toarray() - 5
    with pytest.raises(ValueError, match="non-negative"):
        si.pp.pseudo_spots(neg, 40)


def test_spatialdata_pseudo_spots_run_the_spot_pipeline(c2_sdata):
    """Real C2: 100 µm ST spots → 400 µm squares; the new table embeds like spots do."""
    import copy

    sd = copy.deepcopy(c2_sdata)
    t = sd.tables["table"]
    si.pp.pseudo_spots(sd, 400.0, labels_key="expression_cluster")
    p = sd.tables["pseudo_square_400um"]
    assert np.isclose(p.X.sum(), t.X.sum())
    assert p.obs["n_units"].sum() == t.n_obs
    assert "C2_pseudo_square_400um" in sd.shapes
    from stimg._spatial import sections

    s0, s1 = sections(sd)[0], sections(sd, table_key="pseudo_square_400um")[0]
    assert s1.mpp == pytest.approx(s0.mpp)  # same image, same µm/px
    assert s1.spot_diameter_px == pytest.approx(400 / s0.mpp)
    patches = si.pp.extract_patches(sd, table_key="pseudo_square_400um", patch_um=400, patch_px=32)
    assert len(patches) == p.n_obs and tuple(patches[0].shape) == (3, 32, 32)
    assert float(patches[0].float().std()) > 0  # real tissue, not padding
    with pytest.raises(ValueError, match="already exist"):
        si.pp.pseudo_spots(sd, 400.0)
