import numpy as np
import pytest
import scipy.stats as st
import torch

import stimg as si

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # lightning/scvi chatter


@pytest.fixture
def adata():
    a = si.datasets.synthetic(240, 24, image=False, as_anndata=True, seed=3)
    a.obsm["X_alt"] = a.obsm["X_synthetic"] @ np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    return a


def _nll(model, adata):
    from stimg.models._nb._module import nb_log_prob

    r, b = model._nb_params(adata, 1024, "observed")  # also before training
    y = torch.as_tensor(adata.obsm["_si_nb_counts"], dtype=torch.float64)
    return float(-nb_log_prob(y, torch.from_numpy(r), torch.from_numpy(b)).sum(1).mean())


def test_train_decreases_nll_and_predicts(adata, accelerator):
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    model = si.models.NBRegressor(adata, n_hidden=64)
    before = _nll(model, adata)
    model.train(max_epochs=15, accelerator=accelerator, early_stopping=False, validation_size=0.0, lr=3e-3)
    after = _nll(model, adata)
    assert after < before - 1.0
    assert model.history["elbo_train"].iloc[-1, 0] < model.history["elbo_train"].iloc[0, 0]
    pred = model.predict(adata)
    assert pred.mean.shape == (240, 24) and pred.scale == "log1p" and pred.epistemic is None
    assert np.all(pred.aleatoric >= 0)
    mean, var = model.get_mean_variance(adata)
    assert np.all(var > mean)  # NB is overdispersed: var = mean / p
    # E[log1p Y] ≤ log1p(E[Y]) (Jensen)
    assert np.all(pred.mean <= np.log1p(mean) + 1e-5)
    counts = model.predict(adata, scale="counts")
    np.testing.assert_allclose(counts.mean, mean, rtol=1e-5)


def test_gene_subset_predicts_on_full_table_and_roundtrip(adata, accelerator, tmp_path):
    adata.var["si_target"] = np.arange(adata.n_vars) % 3 == 0
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    model = si.models.NBRegressor(adata, n_hidden=32)
    model.train(max_epochs=2, accelerator=accelerator, train_indices=np.arange(200))
    assert set(model.train_indices_) | set(model.validation_indices_) <= set(range(200))
    genes = list(adata.var_names[adata.var["si_target"]])
    assert model.genes_ == genes and adata.obsm["_si_nb_counts"].shape == (240, 8)
    new = adata[200:].copy()  # another table with all genes
    del new.obsm["_si_nb_counts"]
    si.tl.predict_expression(new, model)
    assert np.isnan(new.layers["si_pred"][:, ~adata.var["si_target"].to_numpy()]).all()
    assert np.isfinite(new.layers["si_pred"][:, adata.var["si_target"].to_numpy()]).all()
    model.save(tmp_path / "nb.stimg")
    loaded = si.models.NBRegressor.load(str(tmp_path / "nb.stimg"))  # no training table needed
    assert loaded.adata is None
    np.testing.assert_array_equal(loaded.predict(new).mean, model.predict(new).mean)
    assert loaded.genes_ == genes
    np.testing.assert_array_equal(loaded.train_indices_, model.train_indices_)


def test_ensemble_epistemic_ood_save_load(adata, accelerator, tmp_path):
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    ens = si.models.NBEnsemble(adata, n_members=3, n_hidden=64)
    ens.train(max_epochs=8, accelerator=accelerator, early_stopping=False, validation_size=0.0, lr=3e-3)
    pred = ens.predict(adata)
    assert pred.epistemic.shape == pred.aleatoric.shape == (240, 24)
    ood = adata.copy()
    rng = np.random.default_rng(1)
    ood.obsm["X_synthetic"] = ood.obsm["X_synthetic"] + rng.normal(0, 5, size=ood.obsm["X_synthetic"].shape).astype(np.float32)
    assert ens.predict(ood).epistemic.mean() > 2 * pred.epistemic.mean()
    members = ens.member_predictions(adata)
    np.testing.assert_allclose(np.mean([m.mean for m in members], 0), pred.mean, rtol=1e-5)
    np.testing.assert_allclose(np.var([m.mean for m in members], 0), pred.epistemic, rtol=1e-4, atol=1e-8)
    lo, hi = ens.predict_interval(adata, level=0.9)
    assert np.all(lo <= hi)
    ens.save(tmp_path / "ens.stimg")
    with pytest.raises(FileExistsError, match="overwrite"):
        ens.save(tmp_path / "ens.stimg")
    loaded = si.models.NBEnsemble.load(tmp_path / "ens.stimg", adata)
    np.testing.assert_array_equal(loaded.predict(adata).epistemic, pred.epistemic)


def test_ensemble_over_encoders_and_plot(adata, accelerator):
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    ens = si.models.NBEnsemble(adata, n_members=2, embedding_keys=["X_synthetic", "X_alt"], n_hidden=16)
    assert ens.embedding_keys == ["X_synthetic", "X_alt"]
    ens.train(max_epochs=1, accelerator=accelerator)
    si.tl.predict_expression(adata, ens)
    assert {"si_pred", "si_aleatoric", "si_epistemic"} <= set(adata.layers)
    axs = si.pl.uncertainty(adata, "gene_0", img=False)
    assert len(axs) == 3


def test_library_offset(adata, accelerator):
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic", library_size=True)
    model = si.models.NBRegressor(adata, n_hidden=16)
    model.train(max_epochs=1, accelerator=accelerator)
    obs, _ = model.get_mean_variance(adata)
    ref, _ = model.get_mean_variance(adata, library_size="reference")
    lib = np.asarray(adata.X.sum(1)).ravel()
    ratio = obs / ref
    np.testing.assert_allclose(ratio, np.broadcast_to((lib / np.exp(np.log(lib).mean()))[:, None], ratio.shape), rtol=1e-4)


def test_setup_validation(adata):
    with pytest.raises(KeyError, match="X_synthetic"):
        si.models.NBRegressor.setup_anndata(adata, embedding_key="X_missing")
    bad = adata.copy()
    bad.obsm["X_synthetic"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        si.models.NBRegressor.setup_anndata(bad, embedding_key="X_synthetic")
    assert "_si_nb_counts" not in bad.obsm  # nothing written on failure
    with pytest.raises(KeyError, match="missing"):
        si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic", genes=["nope"])
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    model = si.models.NBRegressor(adata, n_hidden=8)
    with pytest.raises(RuntimeError, match="not trained"):
        model.predict(adata)
    model.train(max_epochs=1, accelerator="cpu", early_stopping=False, validation_size=0)
    wrong = adata.copy()
    wrong.obsm["X_synthetic"] = wrong.obsm["X_synthetic"][:, :5]
    with pytest.raises(ValueError, match="5 features but the model was trained on 32"):
        model.predict(wrong)


def test_nb_moments_and_quantiles_exact():
    from stimg.models._nb._module import nb_log1p_moments, nb_mixture_quantiles

    r = np.array([[0.5, 2.0, 10.0]])
    mean = np.array([[0.3, 5.0, 80.0]])
    logits = np.log(r / mean)
    m1, v = nb_log1p_moments(r, logits)
    p = 1 / (1 + np.exp(-logits))
    for j in range(3):
        y = np.arange(5000)
        pmf = st.nbinom.pmf(y, r[0, j], p[0, j])
        rel = 1e-8 if j < 2 else 1e-4  # exact below 64 counts, log-grid quadrature above
        assert m1[0, j] == pytest.approx((pmf * np.log1p(y)).sum(), rel=rel)
        assert v[0, j] == pytest.approx((pmf * np.log1p(y) ** 2).sum() - m1[0, j] ** 2, rel=100 * rel)
    lo, hi = nb_mixture_quantiles(r[None], logits[None], (0.05, 0.95))
    np.testing.assert_array_equal(lo[0, :2], st.nbinom.ppf(0.05, r[0, :2], p[0, :2]))
    np.testing.assert_array_equal(hi[0, :2], st.nbinom.ppf(0.95, r[0, :2], p[0, :2]))
    np.testing.assert_allclose(hi[0, 2], st.nbinom.ppf(0.95, r[0, 2], p[0, 2]), rtol=0.03)
