import numpy as np
import pytest

import stimg as si


def _grid(side=12):
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    return np.c_[gx.ravel(), gy.ravel()]


def test_pattern_iou_identical_inverted_constant():
    grid = _grid()
    rng = np.random.default_rng(0)
    smooth = np.c_[grid[:, 0] + grid[:, 1], np.sin(grid[:, 0] / 3.0)].astype(float)
    iou = si.metrics.pattern_iou(smooth, smooth, grid, var_names=["a", "b"])
    assert iou.loc["a"].iloc[0] == 1.0 and iou.loc["b"].iloc[0] == 1.0
    inv = si.metrics.pattern_iou(smooth, -smooth, grid).to_numpy()
    assert np.all(inv < 0.1)
    noisy = smooth + rng.normal(0, 0.5, smooth.shape)
    mid = si.metrics.pattern_iou(smooth, noisy, grid).to_numpy()
    assert np.all((mid > 0.5) & (mid <= 1.0))
    const = np.c_[smooth[:, 0], np.ones(len(grid))]
    assert np.isnan(si.metrics.pattern_iou(const, const, grid).to_numpy()[1, 0])


def test_pattern_iou_groups_and_validation():
    grid = np.r_[_grid(6), _grid(6)]
    y = np.c_[grid[:, 0]].astype(float)
    res = si.metrics.pattern_iou(y, y, grid, groups=["A"] * 36 + ["B"] * 36)
    assert list(res.columns) == ["A", "B"] and np.allclose(res.to_numpy(), 1.0)
    with pytest.raises(ValueError, match="same grid position"):
        si.metrics.pattern_iou(y, y, grid)
    with pytest.raises(ValueError, match="integer"):
        si.metrics.pattern_iou(y[:36], y[:36], grid[:36] + 0.5)


def test_morans_i_truth_and_prediction():
    grid = _grid(10).astype(float)
    rng = np.random.default_rng(0)
    truth = np.c_[grid[:, 0], rng.normal(size=100)]
    pred = np.c_[grid[:, 0] + rng.normal(0, 0.1, 100), rng.normal(size=100)]
    df = si.metrics.morans_i(truth, pred, grid, var_names=["smooth", "noise"], n_neighs=4)
    assert list(df.columns) == ["slide", "gene", "I_true", "I_pred"]
    s = df.set_index("gene")
    assert s.loc["smooth", "I_true"] > 0.8 and s.loc["smooth", "I_pred"] > 0.7
    assert abs(s.loc["noise", "I_true"]) < 0.25


def test_uncertainty_calibration():
    rng = np.random.default_rng(0)
    sd = rng.uniform(0.1, 2.0, size=(300, 1))
    y = rng.normal(0, sd, size=(300, 4))
    lo, hi = -1.645 * sd * np.ones((1, 4)), 1.645 * sd * np.ones((1, 4))
    res = si.metrics.uncertainty_calibration(y, np.zeros_like(y), sd**2 * np.ones((1, 4)), lower=lo, upper=hi,
                                             groups=np.repeat(["a", "b"], 150))
    assert res.spearman > 0.5 and 0.85 < res.coverage < 0.95
    assert list(res.per_slide.index) == ["a", "b"]
    shuffled = si.metrics.uncertainty_calibration(y, np.zeros_like(y), rng.permutation(sd[:, 0]))
    assert abs(shuffled.spearman) < 0.2 and np.isnan(shuffled.coverage)
    with pytest.raises(ValueError, match="both"):
        si.metrics.uncertainty_calibration(y, y, sd[:, 0], lower=lo)
    with pytest.raises(ValueError, match="shape"):
        si.metrics.uncertainty_calibration(y, y, sd[:10, 0])
