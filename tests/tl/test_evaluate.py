from __future__ import annotations

import numpy as np
import pytest

import stimg as si


@pytest.fixture
def adata():
    a = si.datasets.synthetic(80, 6, n_sections=2, image=False, as_anndata=True)
    X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    a.X = X.astype(np.float32)
    return a


def _value(res, group, metric):
    return float(res.query("group == @group and metric == @metric")["value"].iloc[0])


def test_perfect_prediction(adata):
    adata.layers["si_pred"] = np.log1p(adata.X)
    res = si.tl.evaluate(adata)
    assert set(res.columns) == {"group", "metric", "value"}
    assert _value(res, "all", "pcc") == pytest.approx(1.0) and _value(res, "all", "pcc_pooled") == pytest.approx(1.0)
    assert _value(res, "S0", "mse") == pytest.approx(0.0, abs=1e-6) and _value(res, "all", "mae") == pytest.approx(0.0, abs=1e-6)
    assert _value(res, "S1", "n_spots") == 80
    u = adata.uns["si_eval"]
    assert {"summary", "per_gene", "params"} <= set(u) and u["params"]["pred_layer"] == "si_pred"
    assert list(u["per_gene"].columns) == ["S0", "S1", "mean", "pooled"]


def test_matches_metrics_and_counts_constant_genes(adata):
    rng = np.random.default_rng(0)
    pred = np.log1p(adata.X) + rng.normal(0, 0.5, adata.shape)
    pred[:, 0] = 1.0  # constant prediction → excluded and counted
    adata.layers["si_pred"] = pred
    res = si.tl.evaluate(adata, inplace=False)
    assert "si_eval" not in adata.uns  # nothing written
    groups = adata.obs["library_id"].astype(str).to_numpy()
    ref = si.metrics.pearson(np.log1p(adata.X), pred, groups=groups)
    assert _value(res, "all", "pcc") == pytest.approx(ref.mean)
    assert _value(res, "S0", "n_constant") == 1
    assert _value(res, "all", "mse") == pytest.approx(si.metrics.mse(np.log1p(adata.X), pred, groups=groups))
    assert np.isnan(res.attrs["per_gene"].iloc[0, 0])


def test_counts_scale_mask_and_genes(adata):
    adata.layers["si_pred"] = adata.X.copy()  # counts
    adata.uns["si_pred"] = {"params": {"scale": "counts"}}
    s0 = (adata.obs["library_id"] == "S0").to_numpy()
    res = si.tl.evaluate(adata, mask=s0, genes=list(adata.var_names[:3]), groups=None)
    assert _value(res, "all", "pcc") == pytest.approx(1.0) and _value(res, "all", "n_spots") == s0.sum()
    assert _value(res, "all", "n_genes") == 3


def test_errors(adata):
    with pytest.raises(KeyError, match="predict_expression"):
        si.tl.evaluate(adata)
    adata.layers["si_pred"] = np.full(adata.shape, np.nan)
    adata.var["si_predicted"] = True
    with pytest.raises(ValueError, match="non-finite"):
        si.tl.evaluate(adata)
    with pytest.raises(KeyError, match="groups"):
        si.tl.evaluate(adata, groups="nope")
    with pytest.raises(ValueError, match="mask"):
        si.tl.evaluate(adata, mask=np.zeros(adata.n_obs, bool))
