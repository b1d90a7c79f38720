"""Benchmark sampling strategies: sample a pool under budgets, train, score a held-out section."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import logger
from .._spatial import get_table, library_column
from .._utils import progress_bar
from .._validate import assert_key_in, check_matrix
from ._active_sample import METHODS, _image_embedding, active_sample


def ridge_pipeline(n_comps: int = 50, alphas: Sequence[float] = tuple(np.logspace(-1, 4, 11))):
    """Standardise → PCA → ridge (alpha by efficient leave-one-out CV on the training spots).

    The HEST-style downstream model on frozen image embeddings, predicting log1p counts.

    Examples
    --------
    >>> from stimg.tl._simulate import ridge_pipeline
    >>> ridge_pipeline(20)
    Pipeline(...)
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    class _PCA(PCA):  # never more components than the training set allows
        def fit(self, X, y=None):
            self.n_components = int(min(n_comps, X.shape[0] - 1, X.shape[1]))
            return super().fit(X, y)

        def fit_transform(self, X, y=None):
            self.n_components = int(min(n_comps, X.shape[0] - 1, X.shape[1]))
            return super().fit_transform(X, y)

    return make_pipeline(StandardScaler(), _PCA(n_comps, random_state=0), RidgeCV(alphas=list(alphas)))


def _default_model():
    return ridge_pipeline()


def _fit_predict(model: Any, train: AnnData, test: AnnData, emb_key: str, genes: list[str]) -> np.ndarray:
    """Train ``model`` on ``train`` and return log1p predictions for ``test`` over ``genes``."""
    y = _log1p(train[:, genes].X)
    if hasattr(model, "fit") and hasattr(model, "predict") and not isinstance(model, type):
        from sklearn.base import clone

        est = clone(model)
        est.fit(np.asarray(train.obsm[emb_key], dtype=np.float32), y)
        return np.asarray(est.predict(np.asarray(test.obsm[emb_key], dtype=np.float32)))
    if isinstance(model, type) and hasattr(model, "setup_anndata"):  # stimg model class
        tr = train[:, genes].copy()
        model.setup_anndata(tr, embedding_key=emb_key)
        m = model(tr)
        m.train()
        pred = m.predict(test[:, genes].copy())
        return np.asarray(getattr(pred, "mean", pred))
    if callable(model):
        m = model(train[:, genes].copy(), embedding_key=emb_key)
        pred = m.predict(test[:, genes].copy()) if hasattr(m, "predict") else m(test[:, genes].copy())
        mean = np.asarray(getattr(pred, "mean", pred))
        if getattr(pred, "scale", "log1p") == "counts":
            mean = np.log1p(np.maximum(mean, 0))
        return mean
    msg = ("model must be 'ridge', an sklearn-style estimator (fit/predict on embeddings → log1p counts), "
           "a stimg model class, or a callable train_adata -> fitted model with predict(adata).")
    raise TypeError(msg)


def _log1p(x) -> np.ndarray:
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.log1p(np.maximum(x.astype(np.float32), 0))


@d.dedent
def simulate_sampling(
    data: Any,
    methods: Sequence[str] = ("random", "scrl"),
    budgets: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    *,
    test: str | Sequence[str],
    model: Any = "ridge",
    seeds: Iterable[int] = range(5),
    n_genes: int | Sequence[str] = 300,
    embedding_key: str | None = None,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    reference: AnnData | None = None,
    cell_type_key: str = "celltype_major",
    encoder: Any = "scvi",
    method_kwargs: dict[str, dict] | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Simulate budgeted sequencing: sample the pool with each method, train, score held-out sections.

    For every method, budget and seed the training pool (all sections but ``test``) is sampled
    with :func:`stimg.tl.active_sample` (``mode='simulate'``), ``model`` is trained on the sampled
    spots (image embedding → log1p counts of ``n_genes`` genes chosen by variance *on the pool*)
    and evaluated on the held-out sections with :func:`stimg.metrics.pearson` (PCC per gene per
    slide, averaged) and :func:`stimg.metrics.mse`. A single-cell prior for SCRL is fitted once.

    Parameters
    ----------
    %(data)s
    methods
        Methods of :func:`~stimg.tl.active_sample`.
    budgets
        Fractions of the pool (or spot counts).
    test
        Held-out section(s) (values of the library column); never sampled or used for choices.
    model
        ``'ridge'`` (``si.models.RidgeRegressor`` when available, else
        :func:`~stimg.tl._simulate.ridge_pipeline`: standardise → PCA → ridge), an sklearn-style
        estimator on embeddings, or a callable ``(train_adata, embedding_key=) -> model`` whose
        ``predict(adata)`` returns an :class:`~stimg.tl.ExpressionPrediction` or an array.
    seeds
        Seeds (≥ 5 recommended for mean ± sd).
    n_genes
        Number of top-variance genes (log1p, on the pool), or a list of genes.
    embedding_key
        Image embedding in ``.obsm`` (default as in :func:`~stimg.tl.active_sample`).
    %(table_key)s
    %(library_key)s
    reference, cell_type_key, encoder
        Single-cell prior for SCRL (see :func:`~stimg.tl.active_sample`).
    method_kwargs
        Extra keyword arguments per method, e.g. ``{'scrl': {'n_rounds': 10}}``.
    %(progress)s

    Returns
    -------
    Tidy DataFrame with columns ``method``, ``budget``, ``seed``, ``metric`` (``'pcc'``,
    ``'pcc_pooled'``, ``'mse'``), ``value``; ``.attrs['summary']`` holds mean ± sd per method,
    budget and metric. Nothing is written into ``data``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 20, n_sections=2, image=False, as_anndata=True)
    >>> res = si.tl.simulate_sampling(adata, ["random", "grid"], [0.2, 1.0], test="S1", seeds=[0, 1])
    >>> sorted(res["metric"].unique())
    ['mse', 'pcc', 'pcc_pooled']
    """
    from ..metrics import mse, pearson

    start = time.perf_counter()
    table = get_table(data, table_key)
    _, lib = library_column(table, library_key)
    tests = [test] if isinstance(test, str) else list(test)
    if not tests:
        msg = "test= names no section; pass the held-out section(s)."
        raise ValueError(msg)
    for t in tests:
        assert_key_in(list(pd.unique(lib)), t, where="the table's sections")
    is_test = lib.isin(tests).to_numpy()
    if is_test.all():
        msg = "Every section is in test=; leave at least one section for the sampling pool."
        raise ValueError(msg)
    for m in methods:
        if m not in METHODS:
            msg = f"Unknown method {m!r}; choose from {METHODS}."
            raise ValueError(msg)
    budgets = list(budgets)
    if not budgets:
        msg = "budgets is empty."
        raise ValueError(msg)
    seeds = list(seeds)
    emb_key, _, computed = _image_embedding(data, table, embedding_key)
    if computed:
        msg = f"Compute image embeddings first (si.pp.embed); found none in table.obsm: {list(table.obsm)}."
        raise KeyError(msg)
    check_matrix(table.obsm[emb_key], f"obsm[{emb_key!r}]", n_obs=table.n_obs)
    pool = AnnData(X=table.X[~is_test], obs=table.obs[~is_test].copy(), var=pd.DataFrame(index=table.var_names),
                   obsm={k: np.asarray(v)[~is_test] for k, v in table.obsm.items()})
    held = AnnData(X=table.X[is_test], obs=table.obs[is_test].copy(), var=pd.DataFrame(index=table.var_names),
                   obsm={emb_key: np.asarray(table.obsm[emb_key])[is_test]})
    if isinstance(n_genes, (int, np.integer)):
        v = _log1p(pool.X).var(0)
        genes = list(pool.var_names[np.argsort(-v)[: int(n_genes)]])
    else:
        genes = list(n_genes)
        missing = pd.Index(genes).difference(pool.var_names)
        if len(missing):
            msg = f"{len(missing)} genes of n_genes are not in the table, e.g. {list(missing[:3])}."
            raise KeyError(msg)
    model = _default_model() if isinstance(model, str) and model == "ridge" else model
    if isinstance(model, str):
        msg = f"Unknown model {model!r}; use 'ridge' or pass an estimator/callable."
        raise ValueError(msg)
    y_test = _log1p(held[:, genes].X)
    groups_test = lib[is_test].to_numpy()
    kw = {m: dict((method_kwargs or {}).get(m, {})) for m in methods}
    if "scrl" in methods and reference is not None and "prior" not in kw["scrl"]:
        from ..models._sc_prior import SingleCellPrior

        n_cl = kw["scrl"].get("n_clusters", 30)
        kw["scrl"]["prior"] = SingleCellPrior(reference, cell_type_key, encoder=encoder, n_clusters=n_cl).fit(
            pool.var_names)
    rows = []
    cache: dict[tuple, np.ndarray] = {}
    jobs = [(m, b, s) for m in methods for b in budgets for s in seeds]
    for m, b, s in progress_bar(jobs, desc="simulate_sampling", progress=progress):
        sel = active_sample(pool, b, method=m, embedding_key=emb_key, library_key=library_key, seed=s,
                            inplace=False, progress=False, **kw[m])
        mask = sel.iloc[:, 0].to_numpy()
        key = (tuple(np.flatnonzero(mask)),)
        if key not in cache:
            cache[key] = _fit_predict(model, pool[mask], held, emb_key, genes)
        pred = cache[key]
        pr = pearson(y_test, pred, groups=groups_test, var_names=genes)
        for metric, val in (("pcc", pr.mean), ("pcc_pooled", pr.pooled), ("mse", mse(y_test, pred, groups=groups_test))):
            rows.append({"method": m, "budget": b, "seed": s, "metric": metric, "value": float(val)})
    res = pd.DataFrame(rows)
    res.attrs["summary"] = sampling_summary(res)
    logger.info("simulate_sampling: %d runs in %.1fs; PCC mean ± sd:\n%s", len(jobs), time.perf_counter() - start,
                res.attrs["summary"].xs("pcc", level="metric").to_string())
    return res


def sampling_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd (over seeds) per method, budget and metric of a :func:`simulate_sampling` table.

    Examples
    --------
    >>> import pandas as pd
    >>> from stimg.tl._simulate import sampling_summary
    >>> df = pd.DataFrame({"method": ["a", "a"], "budget": [0.1, 0.1], "seed": [0, 1],
    ...                    "metric": ["pcc", "pcc"], "value": [0.1, 0.3]})
    >>> round(float(sampling_summary(df)["mean"].iloc[0]), 3)
    0.2
    """
    g = results.groupby(["metric", "method", "budget"])["value"]
    out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n": g.size()})
    return out


