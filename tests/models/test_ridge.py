from __future__ import annotations

import numpy as np
import pytest

import stimg as si


@pytest.fixture
def adata():
    a = si.datasets.synthetic(100, 12, n_sections=3, image=False, as_anndata=True, embedding_dim=20)
    return a


def test_fit_predict_learns_signal(adata):
    train = adata.obs["library_id"].isin(["S0", "S1"]).to_numpy()
    model = si.models.RidgeRegressor(n_components=10).fit(adata, "X_synthetic", genes=adata.var_names[:6], train_indices=train)
    assert model.cv_scheme_ == "LeaveOneGroupOut" and model.alpha_ in model.alphas and model.n_components_ == 10
    pred = model.predict(adata)
    assert pred.scale == "log1p" and pred.mean.shape == (adata.n_obs, 6) and pred.var_names == list(adata.var_names[:6])
    si.tl.predict_expression(adata, model)
    res = si.tl.evaluate(adata, mask=~train)
    assert res.query("group == 'S2' and metric == 'pcc'")["value"].iloc[0] > 0.3  # synthetic signal is learnable


def test_matches_plain_sklearn_gridsearch(adata):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    genes = list(adata.var_names[:5])
    model = si.models.RidgeRegressor(n_components=8).fit(adata, "X_synthetic", genes=genes)
    X = adata.obsm["X_synthetic"]
    Y = np.log1p(adata[:, genes].X.toarray() if hasattr(adata.X, "toarray") else adata[:, genes].X)
    pipe = Pipeline([("s", StandardScaler()), ("p", PCA(8, svd_solver="full")), ("r", Ridge())])
    gs = GridSearchCV(pipe, {"r__alpha": model.alphas}, cv=LeaveOneGroupOut(), scoring="neg_mean_squared_error")
    gs.fit(X, Y, groups=adata.obs["library_id"].astype(str).to_numpy())
    assert gs.best_params_["r__alpha"] == model.alpha_
    np.testing.assert_allclose(-gs.cv_results_["mean_test_score"], model.cv_results_["mean_mse"], rtol=1e-5)
    np.testing.assert_allclose(gs.predict(X), model.predict(adata).mean, rtol=1e-4, atol=1e-5)


def test_targets_from_select_genes_and_save_load(adata, tmp_path):
    si.pp.select_genes(adata, 4, subset=["S0", "S1"])
    model = si.models.RidgeRegressor(alpha=10.0, n_components=None).fit(adata, "X_synthetic")
    assert model.var_names_ == list(adata.var_names[adata.var["si_target"]]) and model.cv_results_ is None
    path = tmp_path / "ridge.stimg"
    model.save(path)
    with pytest.raises(FileExistsError):
        model.save(path)
    loaded = si.models.RidgeRegressor.load(path)
    np.testing.assert_array_equal(loaded.predict(adata).mean, model.predict(adata).mean)
    assert loaded.alpha_ == model.alpha_ and loaded.var_names_ == model.var_names_
    assert si.models.load_model(path).embedding_key_ == "X_synthetic"


def test_single_section_uses_kfold():
    a = si.datasets.synthetic(60, 5, image=False, as_anndata=True)
    model = si.models.RidgeRegressor(n_components=500).fit(a, "X_synthetic", genes=a.var_names[:2])
    assert model.cv_scheme_.startswith("KFold") and model.n_components_ == 32  # capped by the features


def test_errors(adata):
    with pytest.raises(KeyError, match="select_genes"):
        si.models.RidgeRegressor().fit(adata, "X_synthetic")
    with pytest.raises(KeyError, match="si.pp.embed"):
        si.models.RidgeRegressor().fit(adata, "X_missing", genes=adata.var_names[:2])
    with pytest.raises(ValueError, match="one entry per spot"):
        si.models.RidgeRegressor().fit(adata, "X_synthetic", genes=adata.var_names[:2], train_indices=np.ones(3, bool))
    with pytest.warns(FutureWarning, match="train_indices"):
        si.models.RidgeRegressor(n_components=2).fit(adata, "X_synthetic", genes=adata.var_names[:2],
                                                     train_mask=np.ones(adata.n_obs, bool))
    with pytest.raises(ValueError, match="alpha"):
        si.models.RidgeRegressor(alpha="auto")
    with pytest.raises(RuntimeError, match=r"not trained; call .fit"):
        si.models.RidgeRegressor().predict(adata)
    bad = adata.copy()
    bad.obsm["X_synthetic"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        si.models.RidgeRegressor().fit(bad, "X_synthetic", genes=adata.var_names[:2])


def test_near_constant_feature_does_not_blow_up_predictions():
    """A feature almost constant on a small training set (sparse CNN features) once gave |z| ~ 1e4 on new spots."""
    import stimg as si

    rng = np.random.default_rng(0)
    adata = si.datasets.synthetic(120, 8, image=False, as_anndata=True, seed=1)
    x = rng.normal(size=(adata.n_obs, 20))
    x[:, 0] = 0.0
    x[:60, 0] = rng.normal(scale=1e-5, size=60)  # ~constant on the training spots
    x[60:, 0] = rng.normal(scale=1.0, size=60)  # ordinary on new spots
    adata.obsm["X_f"] = x
    train = np.arange(adata.n_obs) < 60
    model = si.models.RidgeRegressor(n_components=10, alpha=1.0).fit(adata, "X_f", genes=adata.var_names,
                                                                        train_mask=train)
    pred = model.predict(adata[~train]).mean
    y = np.log1p(np.asarray(adata[~train].X.todense() if hasattr(adata.X, "todense") else adata[~train].X))
    assert np.abs(pred).max() < 10 * max(np.abs(y).max(), 1.0)
