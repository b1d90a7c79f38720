"""Benchmark samplers: sample a pool under budgets, train a model on the chosen spots, score held-out sections."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import logger
from .._prediction import ExpressionPrediction
from .._spatial import get_table, library_column
from .._utils import progress_bar
from .._validate import assert_key_in, check_matrix
from ._active_sample import DEFAULT_METHOD, _image_embedding, active_sample

_SIM_LAYER = "si_simulate_pred"
_METRICS = ("pcc", "pcc_pooled", "mse", "mae")


def _fit_ridge(train: AnnData, *, embedding_key: str, genes: list[str], library_key: str, seed: int):
    from ..models import RidgeRegressor

    return RidgeRegressor().fit(train, embedding_key, genes=genes, library_key=library_key)


def _fit_nb(train: AnnData, *, embedding_key: str, genes: list[str], library_key: str, seed: int,
            n_members: int = 5):
    from ..models import NBEnsemble, NBRegressor

    train = train.copy()
    NBRegressor.setup_anndata(train, embedding_key=embedding_key, genes=genes)
    ens = NBEnsemble(train, n_members=n_members, seeds=[seed * n_members + i for i in range(n_members)])
    ens.train(accelerator="cpu", progress=False)
    return ens


#: built-in downstream models of :func:`simulate_sampling`
MODELS: dict[str, Callable[..., Any]] = {"ridge": _fit_ridge, "nb": _fit_nb}


class _EstimatorModel:
    """An sklearn-style estimator (embedding → log1p counts) behind the ``predict(adata)`` contract."""

    def __init__(self, est: Any, embedding_key: str, genes: list[str]) -> None:
        self.est, self.embedding_key, self.genes = est, embedding_key, genes

    def predict(self, adata: AnnData) -> ExpressionPrediction:
        x = np.asarray(adata.obsm[self.embedding_key], dtype=np.float32)
        return ExpressionPrediction(np.asarray(self.est.predict(x)), list(self.genes), scale="log1p")


def _trainer(model: Any) -> Callable[..., Any]:
    """``fit(train_adata, *, embedding_key, genes, library_key, seed) -> model with predict(adata)``."""
    if isinstance(model, str):
        if model not in MODELS:
            msg = f"Unknown model {model!r}; use one of {list(MODELS)}, an sklearn-style estimator or a callable."
            raise ValueError(msg)
        return MODELS[model]
    if hasattr(model, "fit") and hasattr(model, "predict") and hasattr(model, "get_params"):  # sklearn estimator
        def fit_estimator(train, *, embedding_key, genes, library_key, seed):
            from sklearn.base import clone

            est = clone(model)
            y = _log1p(train[:, genes].X)
            est.fit(np.asarray(train.obsm[embedding_key], dtype=np.float32), y)
            return _EstimatorModel(est, embedding_key, genes)

        return fit_estimator
    if callable(model):
        return model
    msg = ("model must be 'ridge', 'nb', an sklearn-style estimator (fit/predict on the embedding → log1p counts) "
           f"or a callable fit(train_adata, *, embedding_key, genes, library_key, seed) -> model; got {type(model)}.")
    raise TypeError(msg)


def _log1p(x) -> np.ndarray:
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.log1p(np.maximum(x.astype(np.float32), 0))


def _labelled(x: Any, what: str, name: Callable[[Any], str]) -> dict[str, Any]:
    if isinstance(x, Mapping):
        out = {str(k): v for k, v in x.items()}
    else:
        items = [x] if isinstance(x, str) or not isinstance(x, Sequence) else list(x)
        out = {name(v): v for v in items}
        if len(out) != len(items):
            msg = f"Two {what} have the same label; pass a dict label → {what[:-1]}."
            raise ValueError(msg)
    if not out:
        msg = f"No {what} given."
        raise ValueError(msg)
    return out


def _label(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return str(getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__)


@d.dedent
def simulate_sampling(
    data: Any,
    methods: Any = ("random", DEFAULT_METHOD),
    budgets: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    *,
    test: str | Sequence[str],
    model: Any = "ridge",
    seeds: Iterable[int] = range(5),
    genes: int | Sequence[str] | Mapping[str, Sequence[str]] = 300,
    embedding_key: str | None = None,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    layer: str | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Simulate budgeted sequencing: sample the pool with each sampler, train a model, score held-out sections.

    For every method, budget and seed:

    1. the pool (all sections but ``test``) is sampled with :func:`stimg.tl.active_sample`
       (``mode='simulate'``: a sampler reads a spot's expression only once it has chosen it);
    2. ``model`` is trained on the chosen spots only, from the image embedding to the raw counts
       of ``genes`` (each model on its own scale);
    3. it predicts the held-out sections through :func:`stimg.tl.predict_expression`, and
       :func:`stimg.tl.evaluate` scores them as everywhere in stimg (:mod:`stimg.metrics`, on log1p
       counts): PCC per gene per slide averaged over genes then slides (``pcc``), pooled PCC
       (``pcc_pooled``), ``mse`` and ``mae``.

    What is fitted, exactly:

    - ``'ridge'``: :class:`stimg.models.RidgeRegressor` with its defaults (standardise → PCA to at
      most 256 components → ridge on log1p counts, alpha by cross-validation grouped by section
      over the chosen spots);
    - ``'nb'``: :class:`stimg.models.NBEnsemble` of 5 :class:`~stimg.models.NBRegressor` members
      (seeds ``5·seed … 5·seed + 4``), trained with their defaults (NB likelihood on raw counts, at
      most 300 epochs, early stopping on 10 % of the chosen spots) on the CPU;
    - an sklearn-style estimator: cloned, fitted on (embedding, log1p counts);
    - a callable ``fit(train_adata, *, embedding_key, genes, library_key, seed)`` returning any model
      whose ``predict(adata)`` gives an :class:`~stimg.tl.ExpressionPrediction`.

    Samplers are built once per method (so SCRL's single-cell prior is fitted once); identical
    training sets are fitted once.

    Parameters
    ----------
    %(data)s
    methods
        Sampler names (:func:`stimg.tl.list_samplers`), sampler objects or functions — or a dict
        label → any of those.
    budgets
        Fractions of the pool (or spot counts).
    test
        Held-out section(s) (values of the library column); never sampled or used for choices.
    model
        ``'ridge'``, ``'nb'``, an sklearn-style estimator, a callable (see above), or a dict label →
        any of those (every model is trained on every sample).
    seeds
        Seeds of the samplers (≥ 5 recommended for mean ± sd).
    genes
        Number of top-variance genes (log1p counts over the whole pool), a list of genes, or a dict
        label → list (several gene sets, each scored).
    embedding_key
        Image embedding in ``.obsm`` (default as in :func:`~stimg.tl.active_sample`).
    %(table_key)s
    %(library_key)s
    layer
        Layer with raw counts; ``None`` uses ``X``.
    method_kwargs
        Options per method label, e.g. ``{'scrl': {'reference': ref, 'n_rounds': 10}}``.
    %(progress)s

    Returns
    -------
    Tidy DataFrame with columns ``method``, ``budget``, ``seed``, ``model``, ``genes``, ``metric``,
    ``value``; ``.attrs['summary']`` holds mean ± sd over seeds per method, budget, model, gene set and
    metric. Nothing is written into ``data``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 20, n_sections=2, image=False, as_anndata=True)
    >>> res = si.tl.simulate_sampling(adata, ["random", "grid"], [0.2, 1.0], test="S1", seeds=[0, 1], genes=10)
    >>> sorted(res["metric"].unique())
    ['mae', 'mse', 'pcc', 'pcc_pooled']
    """
    from ..models._sampling._base import make_sampler
    from ._evaluate import evaluate
    from ._predict import predict_expression

    start = time.perf_counter()
    table = get_table(data, table_key)
    lib_key, lib = library_column(table, library_key)
    lib = lib.astype(str)
    tests = [test] if isinstance(test, str) else [str(t) for t in test]
    if not tests:
        msg = "test= names no section; pass the held-out section(s)."
        raise ValueError(msg)
    for t in tests:
        assert_key_in(list(pd.unique(lib)), t, where="the table's sections")
    is_test = lib.isin(tests).to_numpy()
    if is_test.all():
        msg = "Every section is in test=; leave at least one section for the sampling pool."
        raise ValueError(msg)
    budgets = list(budgets)
    if not budgets:
        msg = "budgets is empty."
        raise ValueError(msg)
    seeds = [int(s) for s in seeds]
    if not seeds:
        msg = "seeds is empty; pass at least one seed."
        raise ValueError(msg)
    meths = _labelled(methods, "methods", _label)
    kw = {k: dict(v) for k, v in (method_kwargs or {}).items()}
    if unknown := sorted(set(kw) - set(meths)):
        msg = f"method_kwargs names {unknown}, which are not among the methods {list(meths)}."
        raise KeyError(msg)
    samplers = {name: make_sampler(m, kw.get(name)) for name, m in meths.items()}
    models = {name: _trainer(m) for name, m in _labelled(model, "models", _label).items()}
    emb_key, _, computed = _image_embedding(data, table, embedding_key)
    if computed:
        msg = f"Compute image embeddings first (si.pp.embed); found none in table.obsm: {list(table.obsm)}."
        raise KeyError(msg)
    check_matrix(table.obsm[emb_key], f"obsm[{emb_key!r}]", n_obs=table.n_obs)
    x = table.layers[layer] if layer is not None else table.X
    obs = pd.DataFrame({"library_id": lib.to_numpy()}, index=table.obs_names)
    lib_col = "library_id"

    def part(mask: np.ndarray, obsm_keys) -> AnnData:
        return AnnData(X=x[mask], obs=obs[mask].copy(), var=pd.DataFrame(index=table.var_names),
                       obsm={k: np.asarray(table.obsm[k])[mask] for k in obsm_keys})

    pool = part(~is_test, [k for k in table.obsm if np.ndim(table.obsm[k]) == 2])
    held = part(is_test, [emb_key])
    gene_sets = _gene_sets(genes, pool)
    rows = []
    fits: dict[tuple, dict[str, float]] = {}
    jobs = [(m, b, s) for m in samplers for b in budgets for s in seeds]
    for m, b, s in progress_bar(jobs, desc="simulate_sampling", progress=progress):
        sel = active_sample(pool, b, method=samplers[m], embedding_key=emb_key, library_key=lib_col, seed=s,
                            inplace=False, progress=False)
        mask = sel.iloc[:, 0].to_numpy(bool)
        chosen = tuple(np.flatnonzero(mask))
        train = pool[mask]
        for mname, fit in models.items():
            for gname, gl in gene_sets.items():
                key = (chosen, mname, gname, s if mname != "ridge" else 0)
                if key not in fits:
                    fitted = fit(train, embedding_key=emb_key, genes=gl, library_key=lib_col, seed=s)
                    h = held.copy()
                    predict_expression(h, fitted, key_added=_SIM_LAYER)
                    ev = evaluate(h, pred_layer=_SIM_LAYER, groups=lib_col, genes=gl, inplace=False)
                    ev = ev[ev["group"] == "all"].set_index("metric")["value"]
                    fits[key] = {k: float(ev[k]) for k in _METRICS}
                rows += [{"method": m, "budget": b, "seed": s, "model": mname, "genes": gname, "metric": k,
                          "value": v} for k, v in fits[key].items()]
    res = pd.DataFrame(rows)
    res.attrs["summary"] = sampling_summary(res)
    logger.info("simulate_sampling: %d samples in %.1fs; PCC mean ± sd:\n%s", len(jobs), time.perf_counter() - start,
                res.attrs["summary"].xs("pcc", level="metric").to_string())
    return res


def _gene_sets(genes: Any, pool: AnnData) -> dict[str, list[str]]:
    if isinstance(genes, (int, np.integer)) and not isinstance(genes, bool):
        if genes < 1:
            msg = f"genes must be ≥ 1 (a number of top-variance genes), got {genes}."
            raise ValueError(msg)
        v = _log1p(pool.X).var(0)
        return {f"top{int(genes)}_variance": list(pool.var_names[np.argsort(-v, kind="stable")[: int(genes)]])}
    sets = {str(k): list(map(str, v)) for k, v in genes.items()} if isinstance(genes, Mapping) else {
        "genes": list(map(str, genes))}
    for name, gl in sets.items():
        if not gl:
            msg = f"gene set {name!r} is empty."
            raise ValueError(msg)
        missing = pd.Index(gl).difference(pool.var_names)
        if len(missing):
            msg = f"{len(missing)} genes of gene set {name!r} are not in the table, e.g. {list(missing[:3])}."
            raise KeyError(msg)
    return sets


def sampling_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd (over seeds) per method, budget, model, gene set and metric of a :func:`simulate_sampling` table.

    Examples
    --------
    >>> import pandas as pd
    >>> from stimg.tl._simulate import sampling_summary
    >>> df = pd.DataFrame({"method": ["a", "a"], "budget": [0.1, 0.1], "seed": [0, 1],
    ...                    "metric": ["pcc", "pcc"], "value": [0.1, 0.3]})
    >>> round(float(sampling_summary(df)["mean"].iloc[0]), 3)
    0.2
    """
    by = ["metric", "method", "budget", *[c for c in ("model", "genes") if c in results.columns]]
    g = results.groupby(by, sort=False)["value"]
    return pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n": g.size()})
