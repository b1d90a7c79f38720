"""Fast log1p moments of the NB: tabulated wide-support sums, interpolated; error bounds tested."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from stimg.models._nb._module import nb_log1p_moments, nb_log1p_moments_fast


def test_table_error_bound_in_the_range_models_produce():
    rng = np.random.default_rng(0)
    n = 4000
    mu = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), (1, n)))
    r = np.exp(rng.uniform(np.log(1e-2), np.log(1e3), (1, n)))
    b = np.log(r / mu)
    ref = nb_log1p_moments(r, b, n_sd=40.0, min_support=64.0, block_genes=512)
    fast = nb_log1p_moments_fast(r, b)
    assert np.abs(fast[0] - ref[0]).max() < 1e-3
    assert np.abs(fast[1] - ref[1]).max() < 1e-2
    # more accurate than the 10-sd summation it replaces (which truncates heavy tails)
    old = nb_log1p_moments(r, b, block_genes=512)
    assert np.abs(fast[0] - ref[0]).max() < np.abs(old[0] - ref[0]).max()


@pytest.mark.parametrize(("r", "mean"), [(0.5, 0.3), (2.0, 5.0), (10.0, 80.0), (0.05, 3.0), (1.0, 0.01)])
def test_table_against_scipy(r, mean):
    p = r / (r + mean)
    y = np.arange(200_000)
    pmf = st.nbinom.pmf(y, r, p)
    e = (pmf * np.log1p(y)).sum()
    v = (pmf * np.log1p(y) ** 2).sum() - e**2
    m1, var = nb_log1p_moments_fast(np.array([[r]]), np.log(np.array([[r / mean]])))
    assert m1[0, 0] == pytest.approx(e, rel=1e-3)
    assert var[0, 0] == pytest.approx(v, rel=1e-3)


def test_outside_the_table_falls_back_to_the_sum():
    r = np.array([[1e-6, 2.0, 5e4], [3.0, 1e5, 1.0]])
    mean = np.array([[1.0, 1e-7, 10.0], [2.0, 50.0, 3e5]])
    b = np.log(r / mean)
    fast = nb_log1p_moments_fast(r, b)
    out = np.array([[True, True, True], [False, True, True]])  # outside r ∈ [1e-4, 1e4] or mean ∈ [1e-5, 1e5]
    rr, cc = np.nonzero(out)
    ref = nb_log1p_moments(r[rr, cc][None], b[rr, cc][None])
    np.testing.assert_allclose(fast[0][rr, cc], ref[0][0])
    np.testing.assert_allclose(fast[1][rr, cc], ref[1][0])
    assert np.isfinite(fast[0]).all() and np.isfinite(fast[1]).all()
