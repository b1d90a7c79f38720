"""Regression metrics defined once (DESIGN §5): PCC per gene per slide and pooled, MSE, MAE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._validate import check_matrix


@dataclass
class PearsonResult:
    """Per-gene Pearson correlations.

    Attributes
    ----------
    mean
        Mean over slides of the per-slide mean PCC over non-constant genes.
    pooled
        Mean over genes of the PCC computed across the spots of all slides together.
    per_gene
        Genes × slides PCC (NaN where the gene is constant in that slide, truth or prediction).
    per_slide
        Mean PCC over non-constant genes, per slide.
    n_constant
        Number of genes excluded per slide because they are constant there.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> y = np.random.default_rng(0).poisson(3, (40, 3)).astype(float)
    >>> res = si.metrics.pearson(y, y + 0.1, groups=["a"] * 20 + ["b"] * 20)
    >>> list(res.per_slide.index)
    ['a', 'b']
    """

    mean: float
    pooled: float
    per_gene: pd.DataFrame
    per_slide: pd.Series
    n_constant: pd.Series

    def __float__(self) -> float:
        return float(self.mean)


def _pcc_columns(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    sa, sb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    const = (sa <= eps * max(1.0, np.abs(a).max(initial=0))) | (sb <= eps * max(1.0, np.abs(b).max(initial=0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / (sa * sb)
    r[const] = np.nan
    return r


def _prepare(y_true, y_pred, groups, var_names):
    yt = check_matrix(y_true, "y_true").astype(np.float64)
    yp = check_matrix(y_pred, "y_pred", n_obs=yt.shape[0], n_cols=yt.shape[1]).astype(np.float64)
    if yt.shape[0] == 0 or yt.shape[1] == 0:
        msg = f"y_true has shape {yt.shape}: no spots or no genes to score; check the selection that produced it."
        raise ValueError(msg)
    g = np.full(yt.shape[0], "all", dtype=object) if groups is None else np.asarray(groups).astype(str)
    if g.shape[0] != yt.shape[0]:
        msg = f"groups has {g.shape[0]} entries for {yt.shape[0]} spots."
        raise ValueError(msg)
    names = pd.Index(var_names if var_names is not None else [str(i) for i in range(yt.shape[1])])
    if len(names) != yt.shape[1]:
        msg = f"var_names has {len(names)} entries for {yt.shape[1]} genes."
        raise ValueError(msg)
    return yt, yp, g, names


def pearson(y_true, y_pred, *, groups: Sequence | None = None, var_names: Sequence[str] | None = None) -> PearsonResult:
    """Pearson correlation per gene across the spots of each slide, averaged over genes.

    Genes constant within a slide (in truth or prediction) are excluded from that slide's mean
    and counted in ``n_constant``. The pooled PCC correlates over all spots together.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` arrays on the same scale (e.g. log1p counts).
    groups
        Slide of each spot; ``None`` treats all spots as one slide.
    var_names
        Gene names for the result tables.

    Returns
    -------
    :class:`PearsonResult`; ``float(result)`` is the mean over slides.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> y = np.random.default_rng(0).poisson(3, (50, 4)).astype(float)
    >>> round(si.metrics.pearson(y, y).mean, 6)
    1.0
    """
    yt, yp, g, names = _prepare(y_true, y_pred, groups, var_names)
    slides = [str(s) for s in pd.unique(g)]
    per_gene = {}
    for s in slides:
        m = g == s
        per_gene[s] = _pcc_columns(yt[m], yp[m]) if m.sum() > 1 else np.full(yt.shape[1], np.nan)
    table = pd.DataFrame(per_gene, index=names)
    per_slide = table.mean(0, skipna=True)
    n_const = table.isna().sum(0).astype(int)
    pooled_cols = _pcc_columns(yt, yp) if yt.shape[0] > 1 else np.full(1, np.nan)
    pooled = float(np.mean(pooled_cols[np.isfinite(pooled_cols)])) if np.isfinite(pooled_cols).any() else float("nan")
    return PearsonResult(float(per_slide.mean()), pooled, table, per_slide, n_const)


def mse(y_true, y_pred, *, groups: Sequence | None = None) -> float:
    """Mean squared error, averaged per slide then over slides.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` arrays on the same scale.
    groups
        Slide of each spot; ``None`` treats all spots as one slide.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> si.metrics.mse(np.zeros((2, 2)), np.ones((2, 2)))
    1.0
    """
    yt, yp, g, _ = _prepare(y_true, y_pred, groups, None)
    return float(np.mean([((yt[g == s] - yp[g == s]) ** 2).mean() for s in pd.unique(g)]))


def mae(y_true, y_pred, *, groups: Sequence | None = None) -> float:
    """Mean absolute error, averaged per slide then over slides.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` arrays on the same scale.
    groups
        Slide of each spot; ``None`` treats all spots as one slide.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> si.metrics.mae(np.zeros((2, 2)), np.ones((2, 2)))
    1.0
    """
    yt, yp, g, _ = _prepare(y_true, y_pred, groups, None)
    return float(np.mean([np.abs(yt[g == s] - yp[g == s]).mean() for s in pd.unique(g)]))
