"""Evaluate predicted expression against measured counts (DESIGN §5, metrics from :mod:`stimg.metrics`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import EVAL_UNS, PRED_LAYER, TABLE_KEY
from .._docs import d
from .._logging import log_added
from .._spatial import get_table
from .._validate import assert_key_in, check_nonempty, obs_mask


@d.dedent
def evaluate(
    data: Any,
    *,
    truth_layer: str | None = None,
    pred_layer: str = PRED_LAYER,
    groups: str | None = "library_id",
    genes: Sequence[str] | None = None,
    mask: np.ndarray | str | None = None,
    table_key: str = TABLE_KEY,
    key_added: str = EVAL_UNS,
    inplace: bool = True,
) -> pd.DataFrame:
    """Score predictions: PCC per gene per slide and pooled, MSE and MAE, all on ``log1p`` counts.

    The truth is ``log1p`` of the raw counts; predictions on the count scale (as recorded by
    :func:`stimg.tl.predict_expression`) are log1p-transformed too. Per slide, the PCC of each gene
    across the slide's spots is averaged over genes; genes constant in a slide (truth or prediction)
    are excluded and counted. The pooled PCC correlates over all evaluated spots together.

    Parameters
    ----------
    %(data)s
    truth_layer
        Layer of raw counts; ``None`` uses ``X``.
    pred_layer
        Layer of predictions (from :func:`stimg.tl.predict_expression`).
    groups
        ``.obs`` column of slides; ``None`` treats all spots as one slide.
    genes
        Genes to score; ``None`` uses ``.var['si_predicted']`` (or every gene with finite predictions).
    mask
        Boolean array or ``.obs`` column of the spots to score (e.g. the held-out section).
    %(table_key)s
    key_added
        ``.uns`` key of the results.
    %(inplace)s

    Returns
    -------
    Tidy :class:`~pandas.DataFrame` with columns ``group``, ``metric``, ``value``: one row per slide
    and metric (``pcc``, ``mse``, ``mae``, ``n_spots``, ``n_genes``, ``n_constant``) plus group
    ``'all'`` (``pcc`` = mean over slides, ``pcc_pooled``, and ``mse``/``mae`` averaged over slides).
    ``.attrs['per_gene']`` holds the genes × slides PCC table (with ``'mean'`` and ``'pooled'``
    columns). With ``inplace=True`` both are also written to ``.uns[key_added]`` (``'summary'``,
    ``'per_gene'``) with ``.uns[key_added]['params']``.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> adata = si.datasets.synthetic(60, 5, n_sections=2, image=False, as_anndata=True)
    >>> adata.layers["si_pred"] = np.log1p(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X)
    >>> res = si.tl.evaluate(adata)
    >>> round(float(res.query("group == 'all' and metric == 'pcc'")["value"].iloc[0]), 6)
    1.0
    """
    import scipy.sparse as sp

    from ..metrics import mae, mse, pearson

    start = time.perf_counter()
    table = get_table(data, table_key)
    assert_key_in(table.layers, pred_layer, where="table.layers", hint="Run si.tl.predict_expression first.")
    if truth_layer is not None:
        assert_key_in(table.layers, truth_layer, where="table.layers", hint="Pass the raw-count layer or None for X.")
    if groups is not None:
        assert_key_in(table.obs, groups, where="table.obs", hint="Pass groups= naming the slide column, or None.")
    rows = np.flatnonzero(obs_mask(table, mask))
    check_nonempty(len(rows), "The evaluation mask", "Select the spots to score.")
    pred_all = np.asarray(table.layers[pred_layer][rows], dtype=np.float64)
    if genes is None:
        if "si_predicted" in table.var:
            cols = np.flatnonzero(table.var["si_predicted"].to_numpy(bool))
        else:
            cols = np.flatnonzero(np.isfinite(pred_all).all(0))
    else:
        genes = [str(g) for g in genes]
        missing = pd.Index(genes).difference(table.var_names)
        if len(missing):
            msg = f"{len(missing)} genes are not in the table (e.g. {list(missing[:3])})."
            raise KeyError(msg)
        cols = table.var_names.get_indexer(genes)
    check_nonempty(len(cols), "The set of predicted genes", "Run si.tl.predict_expression, or pass genes=.")
    names = table.var_names[cols]
    yp = pred_all[:, cols]
    if bad := int((~np.isfinite(yp)).sum()):
        msg = (f"{pred_layer!r} has {bad} non-finite predictions for the scored spots and genes; predict them first "
               "or restrict mask=/genes=.")
        raise ValueError(msg)
    scale = table.uns.get(pred_layer, {}).get("params", {}).get("scale", "log1p")
    if scale == "counts":
        if (yp < 0).any():
            msg = f"{pred_layer!r} is on the count scale but has negative values."
            raise ValueError(msg)
        yp = np.log1p(yp)
    X = table.layers[truth_layer] if truth_layer is not None else table.X
    sub = X[rows][:, cols]
    yt = np.asarray(sub.toarray() if sp.issparse(sub) else sub, dtype=np.float64)
    if not np.isfinite(yt).all() or (yt < 0).any():
        msg = "The truth counts must be finite and non-negative (raw counts; they are log1p-transformed here)."
        raise ValueError(msg)
    yt = np.log1p(yt)
    g = table.obs[groups].astype(str).to_numpy()[rows] if groups is not None else np.full(len(rows), "all", object)

    pr = pearson(yt, yp, groups=g, var_names=names)
    slides = list(pr.per_slide.index)
    recs = []
    for s in slides:
        m = g == s
        recs += [(s, "pcc", float(pr.per_slide[s])), (s, "mse", float(((yt[m] - yp[m]) ** 2).mean())),
                 (s, "mae", float(np.abs(yt[m] - yp[m]).mean())), (s, "n_spots", int(m.sum())),
                 (s, "n_genes", len(cols)), (s, "n_constant", int(pr.n_constant[s]))]
    recs += [("all", "pcc", pr.mean), ("all", "pcc_pooled", pr.pooled), ("all", "mse", mse(yt, yp, groups=g)),
             ("all", "mae", mae(yt, yp, groups=g)), ("all", "n_spots", len(rows)), ("all", "n_genes", len(cols)),
             ("all", "n_constant", int(pr.n_constant.sum()))]
    summary = pd.DataFrame(recs, columns=["group", "metric", "value"])
    per_gene = pr.per_gene.copy()
    per_gene["mean"] = per_gene[slides].mean(1, skipna=True)
    from ..metrics._regression import _pcc_columns

    per_gene["pooled"] = _pcc_columns(yt, yp) if len(rows) > 1 else np.nan
    summary.attrs["per_gene"] = per_gene
    if inplace:
        table.uns[key_added] = {
            "summary": summary.copy(), "per_gene": per_gene,
            "params": {"truth_layer": truth_layer, "pred_layer": pred_layer, "groups": groups, "scale": "log1p",
                       "pred_scale": scale, "n_spots": len(rows), "genes": list(map(str, names))},
        }
        table.uns[key_added]["summary"].attrs = {}
        log_added("uns", key_added, start)
    return summary
