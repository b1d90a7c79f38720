"""Conformal calibration of NB count intervals: scores, levels, coverage on held-out sections, saved state."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import nbinom

import stimg as si
from stimg.models._nb._conformal import ConformalCalibration, coverage_scores, nb_mixture_cdf
from stimg.models._nb._model import _interval


def test_mixture_cdf_and_scores_match_scipy():
    rng = np.random.default_rng(0)
    r = rng.uniform(0.5, 5, (3, 20, 4))
    b = rng.normal(0, 1, (3, 20, 4))
    y = rng.poisson(3, (20, 4)).astype(float)
    want = np.mean([nbinom.cdf(y, r[m], 1 / (1 + np.exp(-b[m]))) for m in range(3)], axis=0)
    assert np.allclose(nb_mixture_cdf(r, b, y), want)
    assert np.allclose(nb_mixture_cdf(r, b, -np.ones_like(y)), 0)
    # the score is the smallest central level whose interval covers y: check against the intervals themselves
    s = coverage_scores(r, b, y)
    for level in (0.5, 0.8, 0.95):
        lo, hi = _interval(r, b, level)
        inside = (y >= lo) & (y <= hi)
        assert np.array_equal(inside[s < level - 1e-6], np.ones((s < level - 1e-6).sum(), bool))
        assert not inside[s > level + 1e-6].any()


def test_calibrated_levels_give_nominal_coverage_on_exchangeable_scores():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, (4000, 5)) ** 0.5  # any score distribution
    cal = ConformalCalibration.from_scores(scores[:2000], method="split", per_gene=True)
    for level in (0.8, 0.9, 0.95):
        lv = cal.levels(level)
        assert lv.shape == (5,)
        covered = (scores[2000:] <= lv).mean()
        assert abs(covered - level) < 0.02
    pooled = ConformalCalibration.from_scores(scores[:2000], method="split")
    assert pooled.levels(0.9, 5).shape == (5,) and np.ptp(pooled.levels(0.9, 5)) == 0
    h, t = cal.to_state()
    back = ConformalCalibration.from_state(h, t)
    assert np.array_equal(back.levels(0.9), cal.levels(0.9)) and back.per_gene
    with pytest.raises(ValueError, match="level"):
        cal.levels(1.5)
    with pytest.raises(ValueError, match="≥ 2 spots"):
        ConformalCalibration.from_scores(scores[:1], method="split")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-member ensemble on 3 of 4 synthetic sections, calibrated by leave-one-section-out."""
    adata = si.datasets.synthetic(360, 8, n_sections=4, image=False, as_anndata=True)
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    train = adata.obs["library_id"].astype(str).isin(["S0", "S1", "S2"]).to_numpy()
    ens = si.models.NBEnsemble(adata, n_members=2, n_hidden=16)
    ens.train(max_epochs=8, accelerator="cpu", train_indices=train, early_stopping=False, validation_size=0.0,
              lr=3e-3)
    return adata, ens, train


def test_ensemble_cross_conformal_calibration_is_saved_and_optional(trained, tmp_path):
    adata, ens, train = trained
    test = adata[~train]
    with pytest.raises(ValueError, match="not calibrated"):
        ens.predict_interval(test, calibrated=True)
    raw = ens.predict_interval(test, level=0.9)
    ens.calibrate("library_id", progress=False)
    cal = ens.calibration_
    assert cal.method == "cross" and cal.groups == ["S0", "S1", "S2"] and int(cal.n_scores[0]) == train.sum() * 8
    lo, hi = ens.predict_interval(test, level=0.9)
    assert np.array_equal(ens.predict_interval(test, level=0.9, calibrated=False)[0], raw[0])
    assert (lo <= hi).all() and np.isfinite(hi).all()
    # the calibrated level differs from the nominal one and moves the bounds accordingly
    lv = float(cal.levels(0.9, 8)[0])
    assert lv != pytest.approx(0.9)
    wider = lv > 0.9
    assert ((hi >= raw[1]) if wider else (hi <= raw[1])).all()
    # coverage reported per gene
    y = test.obsm["_si_nb_counts"]
    res = si.metrics.uncertainty_calibration(np.log1p(y), ens.predict(test).mean, ens.predict(test).epistemic,
                                             lower=lo, upper=hi, observed=y, var_names=ens.genes_)
    assert list(res.per_gene.index) == ens.genes_ and 0 < res.coverage <= 1
    # saved with the model file, and used after loading
    path = ens.save(tmp_path / "ens.stimg")
    back = si.models.load_model(path)
    assert back.calibration_ is not None and back.calibration_.method == "cross"
    lo2, hi2 = back.predict_interval(test, level=0.9)
    assert np.array_equal(lo2, lo) and np.array_equal(hi2, hi)
    # retraining drops the calibration
    ens.train(max_epochs=1, accelerator="cpu", train_indices=train, early_stopping=False, validation_size=0.0)
    assert ens.calibration_ is None


def test_split_conformal_regressor_and_bad_input(trained):
    adata, _, train = trained
    lib = adata.obs["library_id"].astype(str).to_numpy()
    m = si.models.NBRegressor(adata, n_hidden=16)
    with pytest.raises(RuntimeError, match="not trained"):
        m.calibrate()
    m.train(max_epochs=5, accelerator="cpu", train_indices=np.isin(lib, ["S0", "S1"]), early_stopping=False,
            validation_size=0.0)
    with pytest.raises(ValueError, match="used in training"):
        m.calibrate(calibration_indices=lib == "S0")
    with pytest.raises(ValueError, match="≥ 2 training sections"):
        m.calibrate(groups=np.full(adata.n_obs, "one"))
    with pytest.raises(KeyError, match="nope"):
        m.calibrate("nope")
    assert m.calibration_ is None  # nothing written by failed calls
    m.calibrate(calibration_indices=lib == "S2", per_gene=True)
    assert m.calibration_.method == "split" and m.calibration_.per_gene
    lo, hi = m.predict_interval(adata[lib == "S3"], level=0.8)
    assert lo.shape == (int((lib == "S3").sum()), 8)


def test_finetuner_split_conformal_saved(tmp_path):
    sdata = si.datasets.synthetic(48, 4, n_sections=2, mpp=4.0)
    table = sdata.tables["table"]
    held = (table.obs["library_id"].astype(str) == "S1").to_numpy()
    m = si.models.NBFinetuner(sdata, target_key=None, patch_px=32, input_px=32, pretrained=False, n_hidden=8)
    m.train(max_epochs=1, batch_size=16, accelerator="cpu", early_stopping=False, validation_size=0,
            train_indices=~held)
    with pytest.raises(ValueError, match="used in training"):
        m.calibrate(calibration_indices=~held)
    m.calibrate(calibration_indices=held)
    assert m.calibration_.method == "split" and int(m.calibration_.n_scores[0]) == held.sum() * 4
    lo, hi = m.predict_interval(sdata, level=0.9)
    raw = m.predict_interval(sdata, level=0.9, calibrated=False)
    assert lo.shape == (table.n_obs, 4) and (lo <= hi).all()
    back = si.models.NBFinetuner.load(m.save(tmp_path / "ft.stimg"))
    assert np.array_equal(back.predict_interval(sdata, level=0.9)[1], hi)
    assert back.calibration_ is not None and raw[1].shape == hi.shape
