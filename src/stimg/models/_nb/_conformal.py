"""Conformal calibration of NB predictive intervals (split- or cross-conformal over sections).

The score of an observed count ``y`` under a predictive (mixture) NB with CDF ``F`` is the smallest
central level whose interval covers it, ``s = max(1 − 2F(y), 2F(y − 1) − 1)``: ``y`` lies in the
central interval of level ``L`` (quantiles ``(1 ∓ L)/2``) exactly when ``L ≥ s``. Scores of spots the
model did not see (a held-out calibration set, or each training section predicted by a model trained
on the other sections) give the level ``L*`` = the ``⌈(n + 1)τ⌉/n`` empirical quantile of the scores
(pooled over genes by default, or per gene); intervals of level ``L*`` then cover a fraction ``τ`` of new counts when the new section
is exchangeable with the calibration sections (Vovk et al. 2005; Chernozhukov et al. 2021,
distributional conformal prediction). crepes/MAPIE calibrate residuals of continuous point
predictions; for discrete count distributions this PIT-level score is the direct form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_GRID = np.linspace(0.0, 1.0, 1001)


def nb_mixture_cdf(r: np.ndarray, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``P(Y ≤ y)`` under the equal-weight mixture of NB(r_m, p_m = sigmoid(logits_m)).

    ``r``, ``logits``: ``(M, n, g)`` (or ``(n, g)``); ``y``: ``(n, g)`` counts (``y < 0`` gives 0).
    """
    from scipy.special import betainc, expit

    r = np.asarray(r, dtype=np.float64)
    b = np.asarray(logits, dtype=np.float64)
    if r.ndim == 2:
        r, b = r[None], b[None]
    y = np.asarray(y, dtype=np.float64)
    k = np.floor(y)
    out = betainc(r, np.maximum(k, 0.0)[None] + 1.0, expit(b)).mean(0)  # NB CDF = I_p(r, k + 1)
    return np.where(k < 0, 0.0, out)


def coverage_scores(r: np.ndarray, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smallest central level of the predictive NB (mixture) interval that covers each count ``y``."""
    y = np.asarray(y, dtype=np.float64)
    s = np.maximum(1.0 - 2.0 * nb_mixture_cdf(r, logits, y), 2.0 * nb_mixture_cdf(r, logits, y - 1.0) - 1.0)
    return np.clip(s, 0.0, 1.0)


@dataclass
class ConformalCalibration:
    """Per-gene conformal levels of a model's NB predictive intervals.

    Attributes
    ----------
    score_quantiles
        ``(1001, n_genes)`` quantiles (``method='higher'``) of the calibration scores on the grid
        ``0, 0.001, …, 1``; one column (``(1001, 1)``) shared by all genes when ``per_gene`` is false.
    n_scores
        Number of calibration scores (per gene, or one pooled count).
    method
        ``'cross'`` (each training section scored by a model trained on the others) or ``'split'``
        (a held-out calibration set scored by the model itself).
    per_gene
        Whether each gene has its own levels.
    groups
        Calibration sections (``'cross'``) or ``[]``.
    scores
        The ``(n, n_genes)`` calibration scores (kept in memory only, not saved).
    """

    score_quantiles: np.ndarray
    n_scores: np.ndarray
    method: str
    per_gene: bool = False
    groups: list[str] = field(default_factory=list)
    scores: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_scores(cls, scores: np.ndarray, *, method: str, per_gene: bool = False,
                    groups: Sequence[str] = ()) -> ConformalCalibration:
        """Summarise ``(n, g)`` scores (NaN = missing) into per-gene (or pooled) quantiles."""
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] < 2:
            msg = f"conformal calibration needs scores of ≥ 2 spots, got shape {s.shape}."
            raise ValueError(msg)
        cols = [s[:, j] for j in range(s.shape[1])] if per_gene else [s.ravel()]
        qs, ns = [], []
        for c in cols:
            c = c[np.isfinite(c)]
            if c.size < 2:
                msg = "a gene has fewer than 2 calibration scores; calibrate on more spots."
                raise ValueError(msg)
            qs.append(np.quantile(c, _GRID, method="higher"))
            ns.append(c.size)
        return cls(np.stack(qs, 1), np.asarray(ns, dtype=np.int64), method, bool(per_gene), [str(g) for g in groups],
                   scores=s)

    def levels(self, level: float, n_genes: int | None = None) -> np.ndarray:
        """Calibrated central level per gene for a nominal coverage ``level`` (``(n_genes,)``)."""
        if not 0 < level < 1:
            msg = f"level must be in (0, 1), got {level!r}."
            raise ValueError(msg)
        n = self.n_scores.astype(np.float64)
        q = np.minimum(1.0, np.ceil((n + 1.0) * level) / n)  # finite-sample conformal quantile
        idx = np.minimum(np.ceil(q * (len(_GRID) - 1) - 1e-9).astype(int), len(_GRID) - 1)
        lv = self.score_quantiles[idx, np.arange(self.score_quantiles.shape[1])]
        lv = np.minimum(np.nextafter(lv, 2.0), 1.0)  # covered when L ≥ s: step just above the score
        if not self.per_gene and n_genes is not None:
            lv = np.full(n_genes, lv[0])
        return lv

    # the model file stores these (stimg.models._base contract: JSON header + tensors)
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(header, tensors)`` for a model file."""
        header = {"method": self.method, "per_gene": self.per_gene, "groups": list(self.groups)}
        return header, {"score_quantiles": self.score_quantiles.astype(np.float64), "n_scores": self.n_scores}

    @classmethod
    def from_state(cls, header: dict[str, Any], tensors: dict[str, Any]) -> ConformalCalibration:
        """Inverse of :meth:`to_state`."""
        def arr(x):
            return x.numpy() if hasattr(x, "numpy") else np.asarray(x)

        return cls(arr(tensors["score_quantiles"]).astype(np.float64), arr(tensors["n_scores"]).astype(np.int64),
                   str(header["method"]), bool(header.get("per_gene", True)), list(header.get("groups", [])))


def training_groups(adata: Any, groups: str | Sequence | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Group label (as str) of each of ``rows``: an ``.obs`` column name or one label per table row."""
    from ..._validate import assert_key_in

    if isinstance(groups, str):
        assert_key_in(adata.obs, groups, where="adata.obs",
                      hint="Pass groups= naming the section column (e.g. 'library_id') or one label per spot.")
        g = adata.obs[groups].astype(str).to_numpy()
    else:
        g = np.asarray(groups).astype(str)
        if g.shape != (adata.n_obs,):
            msg = f"groups must name an .obs column or give one label per spot ({adata.n_obs}), got shape {g.shape}."
            raise ValueError(msg)
    return g[rows]


def cross_conformal(fit_params: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                    counts: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, labels: np.ndarray, *,
                    per_gene: bool = False, progress: bool | None = None) -> ConformalCalibration:
    """Leave-one-group-out conformal scores: ``fit_params(train_rows, held_rows) -> (r, logits)``.

    Each group of ``rows`` is predicted by a model fitted on the other groups; ``counts(rows)``
    returns the observed counts of the target genes.
    """
    from ..._utils import progress_bar

    uniq = list(dict.fromkeys(labels.tolist()))
    if len(uniq) < 2:
        msg = (f"cross-conformal calibration needs ≥ 2 training sections, got {uniq}; pass calibration_indices= "
               "(spots held out of training) for split-conformal calibration instead.")
        raise ValueError(msg)
    parts = []
    for g in progress_bar(uniq, desc="Conformal calibration folds", progress=progress):
        held, fit = rows[labels == g], rows[labels != g]
        r, b = fit_params(fit, held)
        parts.append(coverage_scores(r, b, counts(held)))
    return ConformalCalibration.from_scores(np.concatenate(parts), method="cross", per_gene=per_gene, groups=uniq)


def resolve_calibrated(model: Any, calibrated: bool | None) -> ConformalCalibration | None:
    """The calibration to apply: ``None`` → the model's when it has one; ``True`` requires one."""
    cal = getattr(model, "calibration_", None)
    if calibrated is None:
        return cal
    if calibrated and cal is None:
        msg = (f"{type(model).__name__} is not calibrated; call .calibrate(groups='library_id') (or with "
               "calibration_indices=) first, or pass calibrated=False for the raw NB intervals.")
        raise ValueError(msg)
    return cal if calibrated else None
