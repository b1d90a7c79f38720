"""Target-gene selection on a chosen subset of sections only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY, TARGET_KEY
from .._docs import d
from .._logging import log_added
from .._spatial import get_table, library_column
from .._validate import assert_key_in, check_nonempty


def _subset_mask(table, subset, library_key) -> np.ndarray:
    if subset is None:
        return np.ones(table.n_obs, bool)
    arr = np.asarray(subset)
    if arr.dtype == bool:
        if arr.shape != (table.n_obs,):
            msg = f"Boolean subset must have one entry per spot ({table.n_obs}), got shape {arr.shape}."
            raise ValueError(msg)
        return arr
    _, libs = library_column(table, library_key)
    wanted = [subset] if isinstance(subset, str) else list(subset)
    present = set(libs.unique())
    if unknown := [w for w in wanted if w not in present]:
        msg = f"Sections {unknown} are not in the table; available: {sorted(present)}."
        raise KeyError(msg)
    return libs.isin(wanted).to_numpy()


@d.dedent
def select_genes(
    data: Any,
    n_top: int = 50,
    *,
    method: str = "variance",
    subset: Sequence[str] | np.ndarray | str | None = None,
    layer: str | None = None,
    min_spots: float = 0.1,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    key_added: str = TARGET_KEY,
    inplace: bool = True,
) -> pd.Index | None:
    """Choose target genes on a subset of sections only (no leakage from test sections).

    Parameters
    ----------
    %(data)s
    n_top
        Number of genes.
    method
        ``"variance"``: top variance of log1p counts (STImage/HEST style);
        ``"hvg"``: scanpy's highly variable genes (``seurat_v3`` on counts, batch-aware by section).
    subset
        Sections (library ids) or a boolean spot mask to choose genes on; ``None`` uses all spots.
    layer
        Raw-count layer; ``None`` uses ``X``.
    min_spots
        Genes detected in fewer than this fraction of the subset's spots are never chosen.
    %(table_key)s
    %(library_key)s
    %(key_added)s
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` the chosen genes (best first). Otherwise writes ``.var[key_added]``
    (bool), ``.var[f'{key_added}_rank']`` (0 = best, -1 not chosen) and ``.uns[key_added]['params']``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(100, 30, n_sections=2, image=False, as_anndata=True)
    >>> si.pp.select_genes(adata, 10, subset=["S0"])
    >>> int(adata.var["si_target"].sum())
    10
    """
    import scipy.sparse as sp

    start = time.perf_counter()
    table = get_table(data, table_key)
    if method not in ("variance", "hvg"):
        msg = f"method must be 'variance' or 'hvg', got {method!r}."
        raise ValueError(msg)
    if int(n_top) < 1:
        msg = f"n_top must be ≥ 1, got {n_top!r}."
        raise ValueError(msg)
    if layer is not None:
        assert_key_in(table.layers, layer, where="table.layers")
    mask = _subset_mask(table, subset, library_key)
    check_nonempty(int(mask.sum()), "The subset of spots", "Pass sections present in the table.")
    X = table.layers[layer] if layer is not None else table.X
    X = X[mask]
    Xd = X.toarray() if sp.issparse(X) else np.asarray(X)
    where = f"table.layers[{layer!r}]" if layer is not None else "table.X"
    if bad := int((~np.isfinite(Xd)).sum()):
        msg = (f"{where} has {bad} non-finite values (NaN/inf) in the subset's spots; drop those spots or pass the "
               "raw-count layer with layer=.")
        raise ValueError(msg)
    if (Xd < 0).any():
        msg = (f"{where} has negative values (min {Xd.min():g}); genes are ranked on log1p of raw counts: pass the "
               "raw-count layer with layer=.")
        raise ValueError(msg)
    detected = (Xd > 0).mean(0)
    eligible = detected >= min_spots
    if int(eligible.sum()) < n_top:
        msg = (f"Only {int(eligible.sum())} genes are detected in ≥ {min_spots:.0%} of the subset's spots, "
               f"fewer than n_top={n_top}; lower n_top or min_spots.")
        raise ValueError(msg)
    if method == "variance":
        score = np.log1p(Xd).var(0)
    else:
        import anndata as ad
        import scanpy as sc

        _, libs = library_column(table, library_key)
        sub = ad.AnnData(X=sp.csr_matrix(Xd[:, eligible]), obs=pd.DataFrame({"b": libs.to_numpy()[mask]}, index=table.obs_names[mask]))
        batch = "b" if sub.obs["b"].nunique() > 1 else None
        res = sc.pp.highly_variable_genes(sub, n_top_genes=int(n_top), flavor="seurat_v3", batch_key=batch,
                                          inplace=False, span=0.5)
        score = np.full(table.n_vars, -np.inf)
        rank_col = "highly_variable_rank"
        score[eligible] = -np.nan_to_num(res[rank_col].to_numpy(), nan=np.inf)
    score = np.where(eligible, score, -np.inf)
    order = np.argsort(-score, kind="stable")[: int(n_top)]
    genes = table.var_names[order]
    if not inplace:
        return genes
    rank = np.full(table.n_vars, -1, dtype=int)
    rank[order] = np.arange(len(order))
    table.var[key_added] = rank >= 0
    table.var[f"{key_added}_rank"] = rank
    table.uns[key_added] = {"params": {"n_top": int(n_top), "method": method, "layer": layer, "min_spots": min_spots,
                                       "subset": None if subset is None else (list(np.atleast_1d(subset)) if np.asarray(subset).dtype != bool else f"mask of {int(mask.sum())} spots")}}
    log_added("var", key_added, start)
    return None
