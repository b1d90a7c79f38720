"""Uncertainty calibration (DESIGN §5): does uncertainty rank errors, and do intervals cover."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._validate import check_matrix
from ._regression import _prepare


@dataclass
class CalibrationResult:
    """Calibration of per-spot uncertainty.

    Attributes
    ----------
    spearman
        Mean over slides of the per-slide Spearman correlation between per-spot uncertainty and
        per-spot absolute error (both averaged over genes).
    coverage
        Fraction of ``(spot, gene)`` values inside their predictive interval (NaN without intervals).
    per_slide
        Per slide: ``spearman``, ``coverage``, ``n_spots``.
    per_gene
        Interval coverage per gene (rows) in each slide (columns) and over all slides
        (column ``'all'``; a single slide without ``groups`` is ``'all'``); ``None`` without intervals.
    """

    spearman: float
    coverage: float
    per_slide: pd.DataFrame
    per_gene: pd.DataFrame | None = None

    def __float__(self) -> float:
        return float(self.spearman)


def uncertainty_calibration(
    y_true,
    y_pred,
    uncertainty,
    *,
    groups: Sequence | None = None,
    lower=None,
    upper=None,
    observed=None,
    var_names: Sequence[str] | None = None,
) -> CalibrationResult:
    """Spearman between per-spot uncertainty and absolute error, and predictive-interval coverage.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` truth and prediction on one scale (e.g. log1p counts).
    uncertainty
        ``(n_spots, n_genes)`` (averaged over genes) or ``(n_spots,)`` per-spot uncertainty,
        e.g. epistemic variance.
    groups
        Slide of each spot; Spearman and coverage are computed per slide.
    lower, upper
        ``(n_spots, n_genes)`` bounds of predictive intervals (e.g. 90 % NB intervals of counts).
    observed
        Values the intervals should cover (e.g. raw counts); ``None`` uses ``y_true``.
    var_names
        Gene names of the columns (index of ``per_gene``).

    Returns
    -------
    :class:`CalibrationResult`; ``float(result)`` is the mean Spearman over slides and
    ``result.per_gene`` the coverage of each gene.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> rng = np.random.default_rng(0)
    >>> sd = rng.uniform(0.1, 2, size=(200, 1))
    >>> y = rng.normal(0, sd, size=(200, 5))
    >>> res = si.metrics.uncertainty_calibration(y, np.zeros_like(y), sd[:, 0] ** 2,
    ...                                          lower=-1.645 * sd + 0 * y, upper=1.645 * sd + 0 * y)
    >>> bool(res.spearman > 0.5), bool(0.85 < res.coverage < 0.95)
    (True, True)
    >>> res.per_gene.shape  # coverage of each of the 5 genes (one column per slide, and 'all')
    (5, 1)
    """
    from scipy.stats import spearmanr

    yt, yp, g, genes = _prepare(y_true, y_pred, groups, var_names)
    n = yt.shape[0]
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.ndim == 2:
        u = check_matrix(u, "uncertainty", n_obs=n, n_cols=yt.shape[1]).mean(1)
    elif u.ndim != 1 or u.shape[0] != n:
        msg = f"uncertainty must have shape ({n},) or {yt.shape}, got {u.shape}."
        raise ValueError(msg)
    if not np.all(np.isfinite(u)):
        msg = "uncertainty has non-finite values."
        raise ValueError(msg)
    if (lower is None) != (upper is None):
        msg = "pass both lower and upper, or neither."
        raise ValueError(msg)
    inside = None
    if lower is not None:
        lo = check_matrix(lower, "lower", n_obs=n, n_cols=yt.shape[1])
        hi = check_matrix(upper, "upper", n_obs=n, n_cols=yt.shape[1])
        obs = yt if observed is None else check_matrix(observed, "observed", n_obs=n, n_cols=yt.shape[1])
        if np.any(lo > hi):
            msg = "lower must be ≤ upper everywhere."
            raise ValueError(msg)
        inside = (obs >= lo) & (obs <= hi)
    err = np.abs(yt - yp).mean(1)
    rows, by_gene = {}, {}
    for s in pd.unique(g):
        m = g == s
        rho = spearmanr(u[m], err[m]).statistic if m.sum() > 2 and np.ptp(u[m]) > 0 else np.nan
        cov = float(inside[m].mean()) if inside is not None else np.nan
        rows[str(s)] = {"spearman": float(rho), "coverage": cov, "n_spots": int(m.sum())}
        if inside is not None:
            by_gene[str(s)] = inside[m].mean(0)
    per = pd.DataFrame.from_dict(rows, orient="index")
    coverage = float(inside.mean()) if inside is not None else float("nan")
    per_gene = None
    if inside is not None:
        by_gene["all"] = inside.mean(0)
        per_gene = pd.DataFrame(by_gene, index=genes)
    return CalibrationResult(float(per["spearman"].mean()), coverage, per, per_gene)
