"""Choose the spatial context (radius, scales) by section-grouped cross-validation on training sections."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY, TARGET_KEY
from .._docs import d
from .._logging import logger
from .._spatial import get_table, library_column
from .._validate import assert_key_in, check_nonempty
from ..metrics._spatial import quiet_loggers
from ..pp._context import _radii, _resolve_method, _written_here, spatial_context

#: Default candidate radii (µm) of :func:`choose_spatial_context`; with ``'concat'``, 0 is "no context".
DEFAULT_CONTEXT_CANDIDATES: tuple[float | tuple[float, ...], ...] = (0.0, 250.0, 500.0, 750.0)


def _label(radii: list[float]) -> str:
    return "+".join(f"{r:g}" for r in radii) + " µm"


def _candidates(candidates) -> list[list[float]]:
    out = [_radii(c) for c in candidates]
    if not out:
        msg = "candidates is empty; pass radii in µm, e.g. (0, 250, 500)."
        raise ValueError(msg)
    labels = [_label(c) for c in out]
    if len(set(labels)) != len(labels):
        msg = f"candidates lists a context twice: {labels}."
        raise ValueError(msg)
    return out


@d.dedent
def choose_spatial_context(
    data: Any,
    embedding_key: str = "X_efficientnet_lite0",
    *,
    candidates: Sequence[float | Sequence[float]] = DEFAULT_CONTEXT_CANDIDATES,
    method: str = "concat",
    train_indices: np.ndarray | str | None = None,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    n_components: int | None = 256,
    cv: int = 5,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    key_added: str | None = None,
    inplace: bool = True,
) -> pd.DataFrame:
    """Pick the context radius (or radii) by section-grouped cross-validation on the training spots.

    Every candidate context is computed with :func:`stimg.pp.spatial_context` and scored by a
    :class:`~stimg.models.RidgeRegressor` (its own alpha chosen inside each fold) trained on all
    but one training section and tested on the held-out one (leave-one-section-out; grouped
    ``cv``-fold over more sections): the score is the mean over held-out sections of the mean PCC
    over genes (:func:`stimg.metrics.pearson`, log1p counts). Spots outside ``train_indices`` are
    never used for choosing. The winner is written as :func:`stimg.pp.spatial_context` would.

    Parameters
    ----------
    %(data)s
    embedding_key
        ``.obsm`` key of the features to pool.
    candidates
        Contexts to compare: each a radius in µm or a list of radii (multi-scale), as
        ``radius_um`` of :func:`stimg.pp.spatial_context`. The default (0, 250, 500, 750 µm with
        ``'concat'``) always includes "no context", so the choice can be "none".
    method
        Aggregation of :func:`stimg.pp.spatial_context` (a name of :func:`~stimg.pp.list_context_methods`).
    %(train_indices)s
        They must span at least two sections.
    genes
        Target genes; ``None`` uses ``.var['si_target']`` (:func:`stimg.pp.select_genes` on the
        training sections).
    layer
        Raw-count layer; ``None`` uses ``X``.
    n_components
        PCA components of the ridge scorer.
    cv
        Maximum number of section folds.
    %(table_key)s
    %(library_key)s
    key_added
        ``.obsm`` key of the chosen context features; ``None`` gives ``'<embedding_key>_context'``.
    %(inplace)s

    Returns
    -------
    A :class:`~pandas.DataFrame` with one row per candidate: ``context`` (label), ``radius_um``,
    ``mean_pcc`` (mean over folds), ``sd_pcc``, one ``pcc_<section>`` column per held-out section
    and ``chosen``. With ``inplace`` the table also gets ``.obsm[key_added]`` and
    ``.uns[key_added]['params']`` (those of :func:`stimg.pp.spatial_context`, plus ``'selection'``:
    the scorer, folds, candidates' scores and the chosen radii).

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> adata = si.datasets.synthetic(100, 12, n_sections=3, image=False, as_anndata=True)
    >>> res = si.tl.choose_spatial_context(adata, "X_synthetic", candidates=[0, 250, 450], n_components=8,
    ...                                    genes=list(adata.var_names))
    >>> adata.uns["X_synthetic_context"]["params"]["radius_um"] == res.loc[res.chosen, "radius_um"].iloc[0]
    True
    """
    from ..metrics import pearson
    from ..models import RidgeRegressor
    from ..models._base import resolve_train_indices
    from ..models._ridge import log1p_counts

    start = time.perf_counter()
    table = get_table(data, table_key)
    assert_key_in(table.obsm, embedding_key, where="table.obsm", hint="Compute image features first (si.pp.embed).")
    cands = _candidates(candidates)
    meth = _resolve_method(method)
    key_added = key_added or f"{embedding_key}_context"
    if inplace and (key_added == embedding_key or (key_added in table.obsm and not _written_here(table, key_added))):
        msg = (f"table.obsm[{key_added!r}] exists and was not written by spatial_context (or is the source); pass "
               "another key_added.")
        raise ValueError(msg)
    if genes is None:
        assert_key_in(table.var, TARGET_KEY, where="table.var",
                      hint="Choose target genes on the training sections (si.pp.select_genes) or pass genes=.")
        genes = table.var_names[table.var[TARGET_KEY].to_numpy(bool)]
    genes = [str(g) for g in genes]
    check_nonempty(len(genes), "The target gene list", "Pass genes= or run si.pp.select_genes.")
    rows = resolve_train_indices(table, train_indices)
    lib_key, libs = library_column(table, library_key)
    groups = libs.to_numpy()[rows]
    n_groups = len(pd.unique(groups))
    if n_groups < 2:
        msg = (f"The training spots span {n_groups} section(s); choosing the context by section-grouped "
               "cross-validation needs at least 2. Pass radius_um yourself to si.pp.spatial_context.")
        raise ValueError(msg)
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    splitter = LeaveOneGroupOut() if n_groups <= cv else GroupKFold(n_splits=int(cv))
    folds = list(splitter.split(rows, groups=groups))
    y = log1p_counts(table, genes, layer, rows)
    from anndata import AnnData

    feats = {_label(c): spatial_context(data, embedding_key, radius_um=c, method=meth, table_key=table_key,
                                        library_key=library_key, inplace=False)[rows] for c in cands}

    records = []
    obs = pd.DataFrame({"section": groups}, index=[str(i) for i in range(rows.size)])
    for c in cands:
        lab = _label(c)
        sub = AnnData(np.expm1(y).astype(np.float32), obs=obs, var=pd.DataFrame(index=genes), obsm={"f": feats[lab]})
        scores = {}
        for tr, va in folds:  # the inner fits stay quiet: one log line for the whole choice
            with quiet_loggers("stimg"):
                model = RidgeRegressor(n_components=n_components, cv=cv).fit(sub, "f", genes=genes, train_indices=tr,
                                                                             library_key="section")
                pred = model.predict(sub[va]).mean
            held = str(groups[va][0]) if len(pd.unique(groups[va])) == 1 else f"fold{len(scores)}"
            scores[held] = float(pearson(y[va], pred, groups=groups[va], var_names=genes).mean)
        vals = np.array(list(scores.values()))
        records.append({"context": lab, "radius_um": c, "mean_pcc": float(vals.mean()),
                        "sd_pcc": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                        **{f"pcc_{k}": v for k, v in scores.items()}})
    res = pd.DataFrame(records)
    best = int(np.nanargmax(res["mean_pcc"].to_numpy()))
    res["chosen"] = np.arange(len(res)) == best
    chosen = cands[best]
    logger.info("spatial context: chose %s by %s over %d training sections (mean PCC %.3f; %.1fs)", _label(chosen),
                type(splitter).__name__, n_groups, res["mean_pcc"].iloc[best], time.perf_counter() - start)
    if not inplace:
        return res
    spatial_context(data, embedding_key, radius_um=chosen, method=meth, table_key=table_key, library_key=library_key,
                    key_added=key_added)
    table.uns[key_added]["params"]["selection"] = {
        "function": "choose_spatial_context", "scorer": f"RidgeRegressor(n_components={n_components})",
        "cv": type(splitter).__name__, "library_key": lib_key, "n_train_spots": int(rows.size),
        "n_genes": len(genes), "candidates": list(res["context"]), "mean_pcc": res["mean_pcc"].tolist(),
        "sd_pcc": res["sd_pcc"].tolist(), "chosen": _label(chosen),
    }
    return res
