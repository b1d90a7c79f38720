import numpy as np
import pytest

import stimg as si


@pytest.fixture
def adata():
    return si.datasets.synthetic(49, 6, n_sections=2, image=False, as_anndata=True, seed=2)  # 7×7 grid, 200 µm


def _brute(x, xy_um, libs, radius, weight=None):
    """Brute-force weighted mean over same-section spots within ``radius`` (the spot included)."""
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(len(x)):
        dist = np.hypot(*(xy_um - xy_um[i]).T)
        nb = (dist <= radius) & (libs == libs[i])
        w = np.ones(nb.sum()) if weight is None else weight(dist[nb])
        out[i] = (w[:, None] * x[nb]).sum(0) / w.sum()
    return out


def test_mean_and_gaussian_match_brute_force_per_section(adata):
    x = adata.obsm["X_synthetic"].astype(np.float64)
    xy = adata.obsm["spatial"] * 1.0  # synthetic: 1 µm/px
    libs = adata.obs["library_id"].to_numpy()
    # both sections share pixel coordinates: any leak across sections would change the result
    assert np.allclose(xy[libs == "S0"], xy[libs == "S1"])
    si.pp.spatial_context(adata, "X_synthetic", radius_um=[250, 450], method="mean", key_added="ctx")
    got = adata.obsm["ctx"]
    assert got.shape == (adata.n_obs, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, :32], _brute(x, xy, libs, 250), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 32:], _brute(x, xy, libs, 450), rtol=1e-5, atol=1e-5)
    p = adata.uns["ctx"]["params"]
    assert p["radius_um"] == [250.0, 450.0] and p["method"] == "mean" and p["embedding_key"] == "X_synthetic"
    counts = [[((np.hypot(*(xy - xy[i]).T) <= r) & (libs == libs[i])).sum() - 1 for i in range(len(x))]
              for r in (250, 450)]
    assert p["median_neighbours"] == [float(np.median(c)) for c in counts] and p["median_neighbours"][0] == 4.0
    g = si.pp.spatial_context(adata, "X_synthetic", radius_um=300, method="gaussian", inplace=False)
    np.testing.assert_allclose(g, _brute(x, xy, libs, 300, lambda dd: np.exp(-0.5 * (dd / 150) ** 2)),
                               rtol=1e-5, atol=1e-5)


def test_concat_and_radius_zero(adata):
    x = adata.obsm["X_synthetic"]
    same = si.pp.spatial_context(adata, "X_synthetic", radius_um=0, method="mean", inplace=False)
    np.testing.assert_array_equal(same, x)
    c = si.pp.spatial_context(adata, "X_synthetic", radius_um=[0, 210], method="concat", inplace=False)
    assert c.shape == (adata.n_obs, 64)  # own features first: radius 0 adds nothing
    np.testing.assert_array_equal(c[:, :32], x)
    np.testing.assert_array_equal(si.pp.spatial_context(adata, "X_synthetic", radius_um=0, method="concat",
                                                        inplace=False), x)
    libs = adata.obs["library_id"].to_numpy()
    xy = adata.obsm["spatial"].astype(float)
    corner = 0  # grid corner: neighbours at +x and +y only
    nb = (np.hypot(*(xy - xy[corner]).T) <= 210) & (libs == libs[corner])
    nb[corner] = False
    assert nb.sum() == 2
    np.testing.assert_allclose(c[corner, 32:], x[nb].mean(0), rtol=1e-6)


def test_radius_is_physical_across_pixel_sizes():
    """Same tissue scanned at 1 and 0.25 µm/px (and Visium-like 100 µm pitch) gives the same context."""
    kw = {"n_sections": 1, "image": False, "as_anndata": True, "seed": 4, "pitch_um": 100.0}
    a = si.datasets.synthetic(64, 5, mpp=1.0, **kw)
    b = si.datasets.synthetic(64, 5, mpp=0.25, **kw)
    assert not np.allclose(a.obsm["spatial"], b.obsm["spatial"])
    np.testing.assert_allclose(b.obsm["X_synthetic"], a.obsm["X_synthetic"])
    ca = si.pp.spatial_context(a, "X_synthetic", radius_um=150, inplace=False)
    cb = si.pp.spatial_context(b, "X_synthetic", radius_um=150, inplace=False)
    np.testing.assert_allclose(ca, cb, rtol=1e-6)
    assert not np.allclose(ca[:, 32:], a.obsm["X_synthetic"])


def test_spatialdata_input_matches_anndata():
    sdata = si.datasets.synthetic(36, 5, n_sections=2, seed=1)
    table = sdata.tables["table"]
    si.pp.spatial_context(sdata, "X_synthetic", radius_um=300, key_added="ctx")
    ad_form = si.datasets.synthetic(36, 5, n_sections=2, seed=1, as_anndata=True)
    np.testing.assert_allclose(table.obsm["ctx"], si.pp.spatial_context(ad_form, "X_synthetic", radius_um=300,
                                                                        inplace=False), rtol=1e-6)


def test_registry_and_bad_input(adata):
    with pytest.raises(KeyError, match="Available"):
        si.pp.spatial_context(adata, "X_nope")
    with pytest.raises(KeyError, match="register"):
        si.pp.spatial_context(adata, "X_synthetic", method="median")
    with pytest.raises(ValueError, match="choose_spatial_context"):
        si.pp.spatial_context(adata, "X_synthetic", radius_um="auto")
    with pytest.raises(ValueError, match="non-negative"):
        si.pp.spatial_context(adata, "X_synthetic", radius_um=-5)
    adata.obsm["mine"] = np.zeros((adata.n_obs, 3))
    with pytest.raises(ValueError, match="not written by spatial_context"):
        si.pp.spatial_context(adata, "X_synthetic", key_added="mine")
    assert adata.obsm["mine"].shape == (adata.n_obs, 3)
    bad = adata.copy()
    bad.obsm["X_synthetic"][3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        si.pp.spatial_context(bad, "X_synthetic")
    assert "X_synthetic_context" not in bad.obsm
    nos = adata.copy()
    for lib in nos.uns["spatial"]:
        nos.uns["spatial"][lib]["scalefactors"] = {}
    with pytest.raises(ValueError, match="µm scale"):
        si.pp.spatial_context(nos, "X_synthetic")
    # a plug-in: inverse-distance weights
    m = si.pp.ContextMethod("inverse_test", lambda dist, r: 1.0 / (1.0 + dist))
    si.pp.register_context_method(m, overwrite=True)
    with pytest.raises(ValueError, match="registered already"):
        si.pp.register_context_method(m)
    out = si.pp.spatial_context(adata, "X_synthetic", radius_um=250, method="inverse_test", inplace=False)
    assert out.shape == adata.obsm["X_synthetic"].shape
    assert "inverse_test" in si.pp.list_context_methods()
    from stimg.pp._context import CONTEXT_METHODS

    CONTEXT_METHODS.pop("inverse_test")


def test_combine_features_multi_scale(adata):
    si.pp.spatial_context(adata, "X_synthetic", radius_um=250, key_added="ctx")
    adata.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "patch_um": 112.0}}
    adata.uns["ctx"]["params"]["encoder"] = "synthetic"
    si.pp.combine_features(adata, ["X_synthetic", "ctx"], key_added="both", standardize=True)
    both = adata.obsm["both"]
    assert both.shape == (adata.n_obs, 96)  # 32 + (own 32 + context 32)
    p = adata.uns["both"]["params"]
    assert p["keys"] == ["X_synthetic", "ctx"] and p["dims"] == [32, 64] and p["encoder"] == "synthetic"
    np.testing.assert_allclose(both[:, :32] * p["scales"][0], adata.obsm["X_synthetic"], rtol=1e-5)
    np.testing.assert_allclose(both[:, :32].var(0).mean(), 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="at least two"):
        si.pp.combine_features(adata, ["ctx"], key_added="x")
    # a model trains on any .obsm key, including these
    adata.var["si_target"] = True
    model = si.models.RidgeRegressor(n_components=8).fit(adata, "both")
    si.tl.predict_expression(adata, model)
    assert np.isfinite(adata.layers["si_pred"]).all()


def test_context_settings_are_part_of_the_embedding_provenance(adata):
    from stimg.models._base import check_embedding, embedding_provenance

    adata.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "patch_um": 112.0, "patch_px": 224}}
    si.pp.spatial_context(adata, "X_synthetic", radius_um=500, method="concat", key_added="ctx")
    prov = embedding_provenance(adata, "ctx")
    assert prov["encoder"] == "synthetic" and prov["patch_um"] == 112.0 and prov["dim"] == 64
    assert "radius_um=[500.0]" in prov["context"] and "'concat'" in prov["context"]
    other = adata.copy()
    si.pp.spatial_context(other, "X_synthetic", radius_um=250, method="concat", key_added="ctx")
    with pytest.raises(ValueError, match="derive it the same way"):
        check_embedding(other, prov)
    assert check_embedding(adata, prov) == "ctx"
