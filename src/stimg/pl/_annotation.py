"""Active-annotation figures: learning curves per selection rule, confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY
from .._spatial import get_table
from .._validate import assert_key_in

_METRIC_LABELS = {
    "weighted_f1": "weighted F1 (model, all spots)",
    "misclassified_pct": "misclassified spots (%)",
    "weighted_f1_annotation": "weighted F1 (labels + predictions)",
    "weighted_f1_unlabelled": "weighted F1 (unlabelled spots)",
}


def annotation_curve(
    results: pd.DataFrame,
    *,
    metric: str = "weighted_f1",
    rules: Sequence[str] | None = None,
    x: str = "round",
    ax: Any = None,
    return_fig: bool = False,
    **kwargs: Any,
):
    """Learning curve of :func:`stimg.tl.simulate_annotation`: a metric per round, mean ± sd over seeds.

    Parameters
    ----------
    results
        Tidy table with columns ``rule``, ``seed``, ``round``, ``n_labelled``, ``metric``, ``value``.
    metric
        ``'weighted_f1'``, ``'misclassified_pct'``, ``'weighted_f1_annotation'`` or
        ``'weighted_f1_unlabelled'``.
    rules
        Rules to show, in this order; ``None`` shows all.
    x
        ``'round'`` or ``'n_labelled'`` (labelled spots, averaged over seeds).
    ax
        Matplotlib axes to draw into.
    return_fig
        Return the figure instead of the axes.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.errorbar`.

    Returns
    -------
    :class:`~matplotlib.axes.Axes` (or the figure with ``return_fig=True``).

    Examples
    --------
    >>> import pandas as pd, stimg as si
    >>> df = pd.DataFrame({"rule": ["random"] * 4, "seed": [0, 1, 0, 1], "round": [1, 1, 2, 2],
    ...                    "n_labelled": [20, 20, 40, 40], "metric": ["weighted_f1"] * 4,
    ...                    "value": [0.5, 0.6, 0.7, 0.72]})
    >>> ax = si.pl.annotation_curve(df)
    """
    import matplotlib.pyplot as plt

    need = {"rule", "round", "n_labelled", "metric", "value"}
    if missing := need - set(results.columns):
        msg = f"results lacks columns {sorted(missing)}; pass the output of si.tl.simulate_annotation."
        raise KeyError(msg)
    if x not in ("round", "n_labelled"):
        msg = f"x must be 'round' or 'n_labelled', got {x!r}."
        raise ValueError(msg)
    sub = results[results["metric"] == metric]
    if sub.empty:
        msg = f"No rows for metric {metric!r}. Available: {sorted(results['metric'].unique())}."
        raise KeyError(msg)
    order = list(pd.unique(sub["rule"])) if rules is None else list(rules)
    if unknown := [r for r in order if r not in set(sub["rule"])]:
        msg = f"Rules {unknown} not in results. Available: {sorted(sub['rule'].unique())}."
        raise KeyError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for r in order:
        g = sub[sub["rule"] == r].groupby("round")
        mean, sd = g["value"].mean(), g["value"].std(ddof=1).fillna(0.0)
        xs = mean.index.to_numpy(dtype=float) if x == "round" else g["n_labelled"].mean().to_numpy(dtype=float)
        ax.errorbar(xs, mean.to_numpy(), yerr=sd.to_numpy(), **{"marker": "o", "ms": 4, "capsize": 3, "label": r,
                                                                 **kwargs})
    ax.set_xlabel("round" if x == "round" else "labelled spots")
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    ax.legend(frameon=False, fontsize="small")
    return ax.figure if return_fig else ax


def confusion(
    data: Any,
    truth_key: str,
    pred_key: str = "si_annotation",
    *,
    normalize: str | None = "true",
    mask: str | np.ndarray | None = None,
    table_key: str = TABLE_KEY,
    cmap: str = "Blues",
    ax: Any = None,
    return_fig: bool = False,
):
    """Confusion matrix of two ``.obs`` label columns (e.g. a pathologist's labels vs ``si_annotation``).

    Spots missing either label are left out.

    Parameters
    ----------
    data
        SpatialData or AnnData.
    truth_key
        ``.obs`` column of reference labels (rows).
    pred_key
        ``.obs`` column of predicted labels (columns).
    normalize
        ``'true'`` (rows sum to 1), ``'pred'`` (columns), ``'all'`` or ``None`` (counts).
    mask
        Only these spots: a boolean ``.obs`` column or mask (e.g. the spots not labelled).
    table_key
        Table of SpatialData input.
    cmap
        Colour map.
    ax
        Axes to draw into.
    return_fig
        Return the figure instead of the axes.

    Returns
    -------
    :class:`~matplotlib.axes.Axes` (or the figure); the matrix is in ``ax.confusion_`` as a DataFrame.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(50, 5, image=False, as_anndata=True)
    >>> adata.obs["pred"] = adata.obs["cell_type"]
    >>> ax = si.pl.confusion(adata, "cell_type", "pred")
    """
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    from .._validate import obs_mask

    table = get_table(data, table_key)
    for k in (truth_key, pred_key):
        assert_key_in(table.obs, k, where="table.obs", hint="Run si.tl.annotate, or pass the label columns.")
    if normalize not in ("true", "pred", "all", None):
        msg = f"normalize must be 'true', 'pred', 'all' or None, got {normalize!r}."
        raise ValueError(msg)
    t = table.obs[truth_key].astype(object)
    p = table.obs[pred_key].astype(object)
    keep = obs_mask(table, mask, "mask") & t.notna().to_numpy() & p.notna().to_numpy()
    if not keep.any():
        msg = f"No spot has both obs[{truth_key!r}] and obs[{pred_key!r}]."
        raise ValueError(msg)
    t, p = t[keep].astype(str).to_numpy(), p[keep].astype(str).to_numpy()

    def _order(col: pd.Series, present: set[str]) -> list[str]:
        cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else sorted(present)
        return [str(c) for c in cats if str(c) in present]

    present = set(t) | set(p)
    labels = _order(table.obs[truth_key], present)
    labels += [c for c in _order(table.obs[pred_key], present) if c not in labels]
    labels += sorted(present - set(labels))
    cm = confusion_matrix(t, p, labels=labels, normalize=normalize)
    if ax is None:
        side = 1.2 + 0.55 * len(labels)
        _, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(cm, cmap=cmap, vmin=0)
    fmt = "{:d}" if normalize is None else "{:.2f}"
    hi = cm.max() / 2 if cm.size else 0
    for i in range(len(labels)):
        for j in range(len(labels)):
            v = cm[i, j]
            if v:
                ax.text(j, i, fmt.format(int(v) if normalize is None else v), ha="center", va="center", fontsize=7,
                        color="white" if v > hi else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(pred_key)
    ax.set_ylabel(truth_key)
    ax.figure.colorbar(im, ax=ax, shrink=0.7)
    ax.confusion_ = pd.DataFrame(cm, index=pd.Index(labels, name=truth_key), columns=pd.Index(labels, name=pred_key))
    return ax.figure if return_fig else ax
