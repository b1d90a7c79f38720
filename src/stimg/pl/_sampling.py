"""Sampling curves: a metric against the sequencing budget, one line per method (mean ± sd)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def sampling_curve(
    results: pd.DataFrame,
    *,
    metric: str = "pcc",
    methods: Sequence[str] | None = None,
    model: str | None = None,
    genes: str | None = None,
    ax=None,
    return_fig: bool = False,
    **kwargs,
):
    """Plot a metric of :func:`stimg.tl.simulate_sampling` against the budget, mean ± sd over seeds.

    Parameters
    ----------
    results
        Tidy table with columns ``method``, ``budget``, ``seed``, ``metric``, ``value``.
    metric
        Metric to plot (``'pcc'``, ``'pcc_pooled'``, ``'mse'``).
    methods
        Methods to show, in this order; ``None`` shows all.
    model, genes
        Downstream model and gene set to show (columns ``model``/``genes`` of ``results``); needed
        only when ``results`` holds several.
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
    >>> df = pd.DataFrame({"method": ["random"] * 4, "budget": [0.1, 0.1, 0.5, 0.5], "seed": [0, 1, 0, 1],
    ...                    "metric": ["pcc"] * 4, "value": [0.1, 0.2, 0.3, 0.35]})
    >>> ax = si.pl.sampling_curve(df)
    """
    import matplotlib.pyplot as plt

    need = {"method", "budget", "metric", "value"}
    if missing := need - set(results.columns):
        msg = f"results lacks columns {sorted(missing)}; pass the output of si.tl.simulate_sampling."
        raise KeyError(msg)
    sub = results[results["metric"] == metric]
    for col, want in (("model", model), ("genes", genes)):
        if col not in sub.columns:
            if want is not None:
                msg = f"results has no {col!r} column; drop {col}=."
                raise KeyError(msg)
            continue
        have = list(pd.unique(sub[col]))
        if want is None and len(have) > 1:
            msg = f"results holds several {col} values {have}; choose one with {col}=."
            raise ValueError(msg)
        if want is not None:
            if want not in have:
                msg = f"{col}={want!r} is not in results. Available: {have}."
                raise KeyError(msg)
            sub = sub[sub[col] == want]
    if sub.empty:
        msg = f"No rows for metric {metric!r}. Available: {sorted(results['metric'].unique())}."
        raise KeyError(msg)
    order = list(pd.unique(sub["method"])) if methods is None else list(methods)
    if unknown := [m for m in order if m not in set(sub["method"])]:
        msg = f"Methods {unknown} not in results. Available: {sorted(sub['method'].unique())}."
        raise KeyError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for m in order:
        g = sub[sub["method"] == m].groupby("budget")["value"]
        mean, sd = g.mean(), g.std(ddof=1).fillna(0.0)
        ax.errorbar(mean.index.to_numpy(dtype=float), mean.to_numpy(), yerr=sd.to_numpy(), marker="o",
                    capsize=3, label=m, **kwargs)
    b = np.sort(sub["budget"].unique().astype(float))
    ax.set_xticks(b)
    ax.set_xticklabels([f"{x:.0%}" if x <= 1 else f"{int(x)}" for x in b])
    ax.set_xlabel("budget (sampled spots)")
    ax.set_ylabel({"pcc": "PCC (mean over genes)", "pcc_pooled": "pooled PCC", "mse": "MSE", "mae": "MAE"}.get(
        metric, metric))
    ax.legend(frameon=False, fontsize="small")
    return ax.figure if return_fig else ax
