"""Spatial metrics defined once (DESIGN §5): Moran's I of truth and prediction, pattern IoU."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd

from .._validate import check_matrix
from ._regression import _prepare


@contextmanager
def quiet_loggers(*names: str, level: int = 30) -> Iterator[None]:
    """Raise the level of third-party loggers (e.g. spatialdata's INFO lines) for a block."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old, strict=True):
            lg.setLevel(lv)


def _coords(coords, n: int, name: str) -> np.ndarray:
    xy = check_matrix(coords, name, n_obs=n, n_cols=2).astype(np.float64)
    return xy


def morans_i(
    y_true,
    y_pred,
    spatial,
    *,
    groups: Sequence | None = None,
    var_names: Sequence[str] | None = None,
    n_neighs: int = 6,
) -> pd.DataFrame:
    """Moran's I of truth and prediction per gene and slide (:func:`squidpy.gr.spatial_autocorr`).

    Each slide gets its own k-nearest-neighbour graph (:func:`squidpy.gr.spatial_neighbors_knn`),
    so spots of different slides are never neighbours. A prediction
    with a Moran's I close to that of the truth reproduces the gene's spatial structure.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` arrays on the same scale (e.g. log1p counts and ``.layers['si_pred']``).
    spatial
        ``(n_spots, 2)`` spot coordinates (e.g. ``.obsm['spatial']``).
    groups
        Slide of each spot; ``None`` treats all spots as one slide.
    var_names
        Gene names.
    n_neighs
        Neighbours per spot (6: Visium hexagonal grid; 4 for the square legacy-ST grid).

    Returns
    -------
    Tidy :class:`~pandas.DataFrame` with columns ``slide``, ``gene``, ``I_true``, ``I_pred``
    (NaN for genes constant in a slide).

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> gx, gy = np.meshgrid(np.arange(10), np.arange(10))
    >>> xy = np.c_[gx.ravel(), gy.ravel()].astype(float)
    >>> y = np.c_[xy[:, 0], np.random.default_rng(0).normal(size=100)]
    >>> df = si.metrics.morans_i(y, y, xy, n_neighs=4)
    >>> bool(df["I_true"].iloc[0] > 0.5)
    True
    """
    import warnings

    from anndata import AnnData

    with warnings.catch_warnings():  # squidpy's docrep decorators warn "'n_jobs' is not a valid key!" on import
        warnings.simplefilter("ignore", SyntaxWarning)
        import squidpy as sq

    yt, yp, g, names = _prepare(y_true, y_pred, groups, var_names)
    xy = _coords(spatial, yt.shape[0], "spatial")
    if n_neighs < 1:
        msg = f"n_neighs must be ≥ 1, got {n_neighs}."
        raise ValueError(msg)
    rows = []
    for s in pd.unique(g):
        m = g == s
        if m.sum() <= n_neighs:
            msg = f"slide {s!r} has {int(m.sum())} spots, too few for n_neighs={n_neighs}."
            raise ValueError(msg)
        res = {}
        for label, y in (("I_true", yt[m]), ("I_pred", yp[m])):
            var = pd.DataFrame(index=[f"g{i}" for i in range(y.shape[1])])
            ad = AnnData(X=y.astype(np.float64), var=var)
            ad.obsm["spatial"] = xy[m]
            with quiet_loggers("spatialdata._logging", "squidpy"):
                sq.gr.spatial_neighbors_knn(ad, n_neighs=n_neighs)
            const = np.ptp(y, axis=0) <= 1e-12
            df = sq.gr.spatial_autocorr(ad, mode="moran", genes=list(var.index), n_perms=None,
                                        copy=True, show_progress_bar=False)
            vals = df["I"].reindex(var.index).to_numpy(dtype=np.float64)
            vals[const] = np.nan
            res[label] = vals
        rows.append(pd.DataFrame({"slide": str(s), "gene": names, **res}))
    return pd.concat(rows, ignore_index=True)


def _binary_smoothed(z_pos: np.ndarray, grid: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth a binary spot map on the spot grid (normalised convolution over present spots), re-binarise."""
    from scipy.ndimage import gaussian_filter

    n, k = z_pos.shape
    img = np.zeros((*shape, k))
    occ = np.zeros(shape)
    img[grid[:, 1], grid[:, 0]] = z_pos
    occ[grid[:, 1], grid[:, 0]] = 1.0
    num = gaussian_filter(img, sigma=(sigma, sigma, 0), mode="constant")
    den = gaussian_filter(occ, sigma=sigma, mode="constant")
    sm = num[grid[:, 1], grid[:, 0]] / den[grid[:, 1], grid[:, 0], None]
    return sm > 0.5


def pattern_iou(
    y_true,
    y_pred,
    grid,
    *,
    groups: Sequence | None = None,
    var_names: Sequence[str] | None = None,
    sigma: float = 1.0,
) -> pd.DataFrame:
    """Spatial-pattern IoU (STImage): z-score, binarise at 0, Gaussian-smooth on the spot grid, IoU.

    For each slide and gene, truth and prediction are standardised over the slide's spots and
    binarised (``z > 0`` → high). Each binary map is placed on the spot grid and smoothed with a
    Gaussian of ``sigma`` grid steps (normalised over the spots present, so tissue borders and
    missing spots do not count as low), then binarised again at 0.5. The score is
    ``|high_true ∩ high_pred| / |high_true ∪ high_pred|`` over the slide's spots.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` arrays.
    grid
        ``(n_spots, 2)`` integer grid coordinates (``obs[['array_x', 'array_y']]``).
    groups
        Slide of each spot; ``None`` treats all spots as one slide.
    var_names
        Gene names.
    sigma
        Gaussian width in grid steps.

    Returns
    -------
    Genes × slides :class:`~pandas.DataFrame` of IoU (NaN where a gene is constant, or neither map
    has a high spot).

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> gx, gy = np.meshgrid(np.arange(8), np.arange(8))
    >>> grid = np.c_[gx.ravel(), gy.ravel()]
    >>> y = np.c_[gx.ravel(), gy.ravel()].astype(float)
    >>> si.metrics.pattern_iou(y, y, grid).to_numpy().ravel().tolist()
    [1.0, 1.0]
    """
    yt, yp, g, names = _prepare(y_true, y_pred, groups, var_names)
    gr = check_matrix(grid, "grid", n_obs=yt.shape[0], n_cols=2)
    if not np.allclose(gr, np.round(gr)):
        msg = "grid must hold integer spot-grid coordinates (e.g. obs[['array_x', 'array_y']])."
        raise ValueError(msg)
    if not sigma > 0:
        msg = f"sigma must be > 0, got {sigma!r}."
        raise ValueError(msg)
    gr = np.round(gr).astype(int)
    out = {}
    for s in pd.unique(g):
        m = g == s
        loc = gr[m] - gr[m].min(0)
        if len(np.unique(loc, axis=0)) != m.sum():
            msg = f"slide {s!r} has several spots on the same grid position."
            raise ValueError(msg)
        shape = (int(loc[:, 1].max()) + 1, int(loc[:, 0].max()) + 1)
        a, b = yt[m], yp[m]
        const = (np.ptp(a, 0) <= 1e-12) | (np.ptp(b, 0) <= 1e-12)
        za = (a - a.mean(0)) > 0
        zb = (b - b.mean(0)) > 0
        ta = _binary_smoothed(za.astype(float), loc, shape, sigma)
        tb = _binary_smoothed(zb.astype(float), loc, shape, sigma)
        inter = (ta & tb).sum(0).astype(float)
        union = (ta | tb).sum(0).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union
        iou[const | (union == 0)] = np.nan
        out[str(s)] = iou
    return pd.DataFrame(out, index=names)
