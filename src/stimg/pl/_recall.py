"""Recall@k curves with their chance level."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def recall(
    result: Any,
    *,
    scopes: Sequence[str] | None = None,
    directions: Sequence[str] | None = None,
    ax=None,
    return_fig: bool = False,
    **kwargs,
):
    """Plot recall@k against k for each retrieval direction, with the chance level dashed.

    Parameters
    ----------
    result
        :class:`~stimg.metrics.RecallResult` from :func:`stimg.metrics.recall_at_k`, or its tidy
        ``table`` (several results can be concatenated with an extra ``label`` column, one line each).
    scopes
        Scopes to draw (``'all'``, ``'in-batch 64'``); ``None``: ``'all'`` only.
    directions
        Directions to draw; ``None``: all.
    ax
        Matplotlib axes to draw into.
    return_fig
        Return the figure instead of the axes.
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.plot`.

    Returns
    -------
    :class:`~matplotlib.axes.Axes` (or the figure with ``return_fig=True``).

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(size=(200, 8))
    >>> res = si.metrics.recall_at_k(img, img + rng.normal(size=img.shape), k=(1, 5, 10, 20), names=("image", "gene"))
    >>> ax = si.pl.recall(res)
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    table = getattr(result, "table", result)
    if not isinstance(table, pd.DataFrame):
        msg = f"result must be a RecallResult (si.metrics.recall_at_k) or its table, got {type(result).__name__}."
        raise TypeError(msg)
    need = {"scope", "direction", "k", "recall", "chance"}
    if missing := need - set(table.columns):
        msg = f"the recall table lacks columns {sorted(missing)}; pass the output of si.metrics.recall_at_k."
        raise KeyError(msg)
    scopes = ["all"] if scopes is None else list(scopes)
    sub = table[table["scope"].isin(scopes)]
    if directions is not None:
        sub = sub[sub["direction"].isin(list(directions))]
    if sub.empty:
        msg = (f"nothing to plot for scopes={scopes}, directions={directions}; the table has scopes "
               f"{sorted(table['scope'].unique())} and directions {sorted(table['direction'].unique())}.")
        raise KeyError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.5))
    by = [c for c in ("label", "scope", "direction") if c in sub.columns and (c != "scope" or len(scopes) > 1)]
    chance_drawn = set()
    for key, g in sub.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        g = g.groupby("k", sort=True)[["recall", "chance"]].mean()
        ax.plot(g.index, g["recall"], marker="o", label=" · ".join(map(str, key)), **kwargs)
        ck = tuple(g["chance"].round(12))
        if ck not in chance_drawn:
            ax.plot(g.index, g["chance"], ls="--", color="0.5", lw=1,
                    label="chance" if not chance_drawn else None)
            chance_drawn.add(ck)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, None)
    ax.legend(frameon=False, fontsize="small")
    return ax.figure if return_fig else ax
