"""Expression features for classifiers: log-normalised HVGs, and Harmony integration across sections."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._spatial import get_table, library_column
from .._validate import assert_key_in


def _counts(table, layer: str | None):
    if layer is not None:
        assert_key_in(table.layers, layer, where="table.layers", hint="Pass the raw-count layer, or layer=None for X.")
        return table.layers[layer]
    return table.X


def lognorm_expression(table, genes: Sequence[str], *, layer: str | None = None, target_sum: float = 1e4) -> np.ndarray:
    """``log1p`` of counts scaled to ``target_sum`` per spot (library over all genes), for ``genes``.

    The usual "normalised and log-transformed" expression (scanpy's ``normalize_total`` then
    ``log1p``), computed without modifying the table.

    Parameters
    ----------
    table
        AnnData with raw counts in ``X`` or ``layer``.
    genes
        Genes to return, in this order.
    layer
        Raw-count layer; ``None`` uses ``X``.
    target_sum
        Counts per spot after scaling.

    Returns
    -------
    Dense ``(n_obs, len(genes))`` float32 array.
    """
    import scipy.sparse as sp

    X = _counts(table, layer)
    genes = [str(g) for g in genes]
    missing = pd.Index(genes).difference(table.var_names)
    if len(missing):
        msg = (f"{len(missing)} of {len(genes)} expression features are not genes of this table "
               f"(e.g. {list(missing[:5])}); the new section must be measured on the same genes.")
        raise KeyError(msg)
    lib = np.asarray(X.sum(1)).ravel().astype(np.float64)
    if not np.all(np.isfinite(lib)) or (lib < 0).any():
        msg = "counts must be finite and non-negative; pass raw counts (layer=)."
        raise ValueError(msg)
    sub = X[:, table.var_names.get_indexer(genes)]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(np.maximum(sub, 0) * scale[:, None]).astype(np.float32)


def hvg_genes(table, n_top: int, *, layer: str | None = None, library_key: str | None = None,
              min_spots: float = 0.01) -> list[str]:
    """Top ``n_top`` highly variable genes (``seurat_v3``, batch-aware), capped by the detected genes."""
    import scipy.sparse as sp

    from ._genes import select_genes

    X = _counts(table, layer)
    detected = np.asarray((X > 0).mean(0) if sp.issparse(X) else (np.asarray(X) > 0).mean(0)).ravel()
    n = int(min(n_top, int((detected >= min_spots).sum())))
    if n < 2:
        msg = f"Fewer than 2 genes are detected in ≥ {min_spots:.0%} of spots; expression features need counts."
        raise ValueError(msg)
    return [str(g) for g in select_genes(table, n, method="hvg", layer=layer, min_spots=min_spots,
                                         library_key=library_key, inplace=False)]


@d.dedent
def integrate_expression(
    data: Any,
    *,
    library_key: str | None = None,
    n_top_genes: int = 1000,
    n_comps: int = 50,
    layer: str | None = None,
    theta: float = 2.0,
    seed: int | None = None,
    table_key: str = TABLE_KEY,
    key_added: str = "X_harmony",
    inplace: bool = True,
) -> np.ndarray | None:
    """Batch-corrected expression embedding of several sections with Harmony (harmonypy).

    Highly variable genes are chosen over all sections (``seurat_v3``, batch-aware), their
    normalised log expression (:func:`lognorm_expression`) is scaled and reduced by PCA, and
    Harmony removes the section effect from the principal components. The result lets a
    classifier with an expression branch (:class:`~stimg.models.SpotClassifier` with
    ``expression=key_added``) trained on one section predict another (ActiveVisium's transfer).

    Parameters
    ----------
    %(data)s
    %(library_key)s
    n_top_genes
        Highly variable genes (capped by the genes detected in ≥ 1 %% of spots).
    n_comps
        Principal components corrected by Harmony.
    layer
        Raw-count layer; ``None`` uses ``X``.
    theta
        Harmony's diversity penalty.
    seed
        Seed of PCA and Harmony; ``None`` uses :attr:`stimg.settings.seed`.
    %(table_key)s
    key_added
        ``.obsm`` key of the corrected embedding; parameters (genes included) go to ``.uns[key_added]``.
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` the ``(n_obs, n_comps)`` corrected embedding; otherwise ``None``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(100, 40, n_sections=2, image=False, as_anndata=True)
    >>> si.pp.integrate_expression(adata, n_top_genes=30, n_comps=10)
    >>> adata.obsm["X_harmony"].shape
    (200, 10)
    """
    import harmonypy
    from sklearn.decomposition import PCA

    from .._settings import settings

    start = time.perf_counter()
    seed = settings.seed if seed is None else int(seed)
    table = get_table(data, table_key)
    key, libs = library_column(table, library_key)
    n_sec = libs.nunique()
    if n_sec < 2:
        msg = (f"integrate_expression needs spots of at least 2 sections to integrate, found {n_sec} "
               f"(column {key!r}); concatenate the sections into one table first.")
        raise ValueError(msg)
    if int(n_comps) < 2:
        msg = f"n_comps must be ≥ 2, got {n_comps!r}."
        raise ValueError(msg)
    genes = hvg_genes(table, n_top_genes, layer=layer, library_key=library_key)
    x = lognorm_expression(table, genes, layer=layer).astype(np.float64)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    x = np.clip(x, -10, 10)
    k = int(min(n_comps, x.shape[1], x.shape[0] - 1))
    pcs = PCA(k, random_state=seed).fit_transform(x)
    meta = pd.DataFrame({"section": libs.to_numpy()}, index=table.obs_names)
    ho = harmonypy.run_harmony(pcs, meta, "section", theta=theta, verbose=False, random_state=seed)
    z = np.asarray(ho.Z_corr, dtype=np.float32)
    if z.shape != pcs.shape:  # harmonypy < 2 returns components × spots
        z = np.ascontiguousarray(z.T)
    logger.info("integrate_expression: %d sections, %d HVGs → %d PCs corrected by Harmony", n_sec, len(genes), k)
    if not inplace:
        return z
    table.obsm[key_added] = z
    table.uns[key_added] = {"params": {"method": "harmony", "library_key": key or "", "n_top_genes": len(genes),
                                       "n_comps": k, "layer": layer, "theta": float(theta), "seed": seed,
                                       "genes": genes}}
    log_added("obsm", key_added, start)
    return None
