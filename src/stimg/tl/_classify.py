"""High/low expression classification from image features (STImage, DESIGN §4)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY, TARGET_KEY
from .._docs import d
from .._logging import log_added
from .._spatial import get_table, library_column
from .._utils import progress_bar, warn
from .._validate import assert_key_in, check_matrix, check_nonempty


def _sklearn_version() -> tuple[int, int]:
    import sklearn

    major, minor = sklearn.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _train_rows(table, train_mask) -> np.ndarray:
    if train_mask is None:
        return np.ones(table.n_obs, dtype=bool)
    if isinstance(train_mask, str):
        assert_key_in(table.obs, train_mask, where="table.obs", hint="e.g. the 'si_sampled' mask of si.tl.active_sample.")
        m = table.obs[train_mask].to_numpy()
    else:
        m = np.asarray(train_mask)
    if m.dtype != bool or m.shape != (table.n_obs,):
        msg = f"train_mask must be a boolean mask of length {table.n_obs} (or an .obs column holding one)."
        raise ValueError(msg)
    check_nonempty(int(m.sum()), "train_mask")
    return m


@d.dedent
def classify_expression(
    data: Any,
    *,
    embedding_key: str,
    genes: Sequence[str] | None = None,
    target_key: str | None = TARGET_KEY,
    layer: str | None = None,
    train_mask: str | np.ndarray | None = None,
    library_key: str | None = None,
    C: float = 10.0,
    l1_ratio: float = 0.5,
    max_iter: int = 1000,
    tol: float = 1e-3,
    seed: int = 0,
    table_key: str = TABLE_KEY,
    key_added: str = "si_high_prob",
    inplace: bool = True,
    progress: bool | None = None,
) -> pd.DataFrame | None:
    """Classify each spot as high or low expression per gene from image features (STImage).

    Labels: log1p counts are z-scored within each section and ``z > 0`` is "high". One
    elastic-net logistic regression per gene (scikit-learn ``saga``, ``l1_ratio`` 0.5, features
    standardised on the training spots) is fitted on the training spots and predicts
    P(high) for every spot.

    Parameters
    ----------
    %(data)s
    embedding_key
        ``.obsm`` key of the image features.
    genes
        Genes to classify; ``None`` uses the boolean ``.var[target_key]`` when present, else all.
    target_key
        Boolean ``.var`` column of target genes.
    layer
        Raw-count layer; ``None`` uses ``X``.
    train_mask
        Boolean mask (or ``.obs`` column) of the spots to fit on; ``None`` uses all spots.
    %(library_key)s
    C
        Inverse regularisation strength (STImage: strength 0.1 → ``C = 10``).
    l1_ratio
        Elastic-net mixing (0: ridge, 1: lasso).
    max_iter
        Maximum saga iterations per gene.
    tol
        Stopping tolerance of saga.
    seed
        Random state of saga.
    %(table_key)s
    key_added
        Layer of P(high).
    %(inplace)s
    %(progress)s

    Returns
    -------
    With ``inplace=False`` a spots × genes :class:`~pandas.DataFrame` of P(high); otherwise ``None``
    and the table gets

    - ``.layers[key_added]``: P(high) (NaN for genes not classified),
    - ``.uns[key_added]``: ``params``, ``genes``, per-gene ``n_nonzero_coef`` and the
      training-spot high fraction ``frac_high``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 10, image=False, as_anndata=True)
    >>> si.tl.classify_expression(adata, embedding_key="X_synthetic", max_iter=100)  # doctest: +SKIP
    >>> adata.layers["si_high_prob"].shape  # doctest: +SKIP
    (200, 10)
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    table = get_table(data, table_key)
    assert_key_in(table.obsm, embedding_key, where="table.obsm", hint="Compute image features first (si.pp.embed).")
    x = check_matrix(table.obsm[embedding_key], f"obsm[{embedding_key!r}]", n_obs=table.n_obs).astype(np.float64)
    if genes is None:
        if target_key is not None and target_key in table.var:
            genes = list(table.var_names[table.var[target_key].to_numpy(dtype=bool)])
        else:
            genes = list(table.var_names)
    genes = [str(g) for g in genes]
    check_nonempty(len(genes), "genes")
    missing = pd.Index(genes).difference(table.var_names)
    if len(missing):
        msg = f"{len(missing)} genes are not in the table (e.g. {list(missing[:5])})."
        raise KeyError(msg)
    if not 0 <= l1_ratio <= 1 or not C > 0:
        msg = f"need 0 ≤ l1_ratio ≤ 1 and C > 0, got l1_ratio={l1_ratio}, C={C}."
        raise ValueError(msg)
    train = _train_rows(table, train_mask)
    if layer is not None:
        assert_key_in(table.layers, layer, where="table.layers")
    src = table.X if layer is None else table.layers[layer]
    counts = check_matrix(src[:, table.var_names.get_indexer(genes)], "counts", n_obs=table.n_obs)
    if (counts < 0).any():
        msg = (f"counts of the target genes have negative values (min {counts.min():g}); labels come from log1p of "
               "raw counts: pass the raw-count layer with layer=.")
        raise ValueError(msg)
    y = np.log1p(counts)
    _, libs = library_column(table, library_key)
    z = np.empty_like(y)
    for lib in pd.unique(libs):
        m = (libs == lib).to_numpy()
        z[m] = y[m] - y[m].mean(0)
    labels = z > 0
    scaler = StandardScaler().fit(x[train])
    xs, xt = scaler.transform(x), scaler.transform(x)[train]
    # scikit-learn ≥ 1.8 infers the elastic net from l1_ratio and deprecates ``penalty``
    penalty = {} if _sklearn_version() >= (1, 8) else {"penalty": "elasticnet"}
    prob = np.full((table.n_obs, len(genes)), np.nan, dtype=np.float32)
    n_nonzero, frac_high, skipped, not_converged = {}, {}, [], 0
    for j in progress_bar(range(len(genes)), desc="Classifying genes", progress=progress):
        yt = labels[train, j]
        frac_high[genes[j]] = float(yt.mean())
        if yt.all() or not yt.any():
            skipped.append(genes[j])
            continue
        clf = LogisticRegression(solver="saga", l1_ratio=l1_ratio, C=C, max_iter=max_iter, tol=tol, random_state=seed,
                                 **penalty)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xt, yt)
        not_converged += int(clf.n_iter_[0] >= max_iter)
        prob[:, j] = clf.predict_proba(xs)[:, 1]
        n_nonzero[genes[j]] = int((clf.coef_ != 0).sum())
    if skipped:
        warn(f"{len(skipped)} genes have a single class on the training spots and were not classified "
             f"(e.g. {skipped[:3]}); their probabilities are NaN.")
    if not_converged:
        warn(f"saga did not converge within max_iter={max_iter} for {not_converged} genes; raise max_iter.")
    if not inplace:
        return pd.DataFrame(prob, index=table.obs_names, columns=genes)
    full = np.full((table.n_obs, table.n_vars), np.nan, dtype=np.float32)
    full[:, table.var_names.get_indexer(genes)] = prob
    table.layers[key_added] = full
    table.uns[key_added] = {
        "params": {"embedding_key": embedding_key, "layer": layer, "C": C, "l1_ratio": l1_ratio,
                   "max_iter": max_iter, "tol": tol, "seed": seed, "n_train": int(train.sum()),
                   "library_key": library_key, "table_key": table_key},
        "genes": genes, "n_nonzero_coef": n_nonzero, "frac_high": frac_high,
    }
    log_added("layers", key_added, start)
    return None
