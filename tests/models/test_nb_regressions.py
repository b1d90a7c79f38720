"""Regression tests for NB crashes found while adding spatial context (issue 15, item 4)."""

import numpy as np
import pytest
import scipy.optimize as so
import scipy.stats as st

import stimg as si

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # lightning/scvi chatter


@pytest.mark.parametrize("kmax", [1.2, 62.0, 63.01, 63.5, 64.0])
def test_nodes_and_weights_match_at_the_exact_support_edge(kmax):
    from stimg.models._nb._module import _nodes

    y, lw = _nodes(kmax, 64, 192)
    assert y.shape == lw.shape
    assert y[0] == 0 and y[-1] >= kmax and np.all(np.diff(y.numpy()) == 1)


def test_log1p_moments_when_support_bound_lies_in_63_64():
    """A block whose support bound mean + 10 sd is in (63, 64] used to crash (64 nodes, 65 weights)."""
    from stimg.models._nb._module import nb_log1p_moments, nb_mixture_quantiles

    r = 3.0
    m = so.brentq(lambda m: m + 10 * np.sqrt(m * (1 + m / r)) - 63.5, 0.01, 60)
    logits = np.full((4, 1), np.log(r / m))
    m1, v = nb_log1p_moments(np.full((4, 1), r), logits)
    p = 1 / (1 + np.exp(-logits[0, 0]))
    y = np.arange(5000)
    pmf = st.nbinom.pmf(y, r, p)
    assert m1[0, 0] == pytest.approx((pmf * np.log1p(y)).sum(), rel=1e-6)
    assert v[0, 0] == pytest.approx((pmf * np.log1p(y) ** 2).sum() - m1[0, 0] ** 2, rel=1e-4)
    lo, hi = nb_mixture_quantiles(np.full((1, 4, 1), r), logits[None], (0.05, 0.95))
    assert hi[0, 0] == st.nbinom.ppf(0.95, r, p) and lo[0, 0] == st.nbinom.ppf(0.05, r, p)


def test_nb_trains_on_an_obsm_entry_taken_from_another_tables_view(accelerator):
    a = si.datasets.synthetic(120, 8, image=False, as_anndata=True, seed=1)
    b = a.copy()
    a.obsm["X_view"] = b[np.arange(a.n_obs)].obsm["X_synthetic"]  # an anndata ArrayView, not an ndarray
    assert type(a.obsm["X_view"]) is not np.ndarray
    si.models.NBRegressor.setup_anndata(a, embedding_key="X_view")
    model = si.models.NBRegressor(a, n_hidden=8)
    model.train(max_epochs=2, accelerator=accelerator, progress=False)
    pred = model.predict(a)
    assert np.isfinite(pred.mean).all() and pred.mean.shape == (120, 8)
    ens = si.models.NBEnsemble(a, n_members=2, n_hidden=8)
    ens.train(max_epochs=1, accelerator=accelerator)
    assert np.isfinite(ens.predict(a).epistemic).all()


def test_nb_input_scaling_is_isotropic_by_default():
    """Z-scoring each feature inflated low-variance context features (issue 15): one scale by default."""
    a = si.datasets.synthetic(80, 6, image=False, as_anndata=True, seed=2)
    si.pp.spatial_context(a, "X_synthetic", radius_um=500, key_added="ctx")
    emb = a.obsm["ctx"].astype(np.float64)
    assert emb[:, 32:].std(0).mean() < 0.8 * emb[:, :32].std(0).mean()  # the context block varies less
    si.models.NBRegressor.setup_anndata(a, embedding_key="ctx")
    iso = si.models.NBRegressor(a, n_hidden=8)
    sd = iso.module.feature_std.numpy()
    np.testing.assert_allclose(sd, emb.std(0).mean(), rtol=1e-5)
    per = si.models.NBRegressor(a, n_hidden=8, standardize="per_feature")
    np.testing.assert_allclose(per.module.feature_std.numpy(), emb.std(0), rtol=1e-4)
    with pytest.raises(ValueError, match="standardize must be one of"):
        si.models.NBRegressor(a, standardize="zscore")
