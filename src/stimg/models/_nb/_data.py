"""Target genes and raw counts, shared by :class:`NBRegressor` and :class:`NBFinetuner` (one copy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ..._utils import warn
from ..._validate import assert_key_in, check_matrix, check_nonempty


def counts_source(adata: AnnData, layer: str | None):
    """``adata.layers[layer]`` (checked) or ``adata.X``."""
    if layer is None:
        return adata.X
    assert_key_in(adata.layers, layer, where="adata.layers", hint="Pass the raw-count layer, or layer=None for X.")
    return adata.layers[layer]


def resolve_genes(adata: AnnData, target_key: str | None, genes: Sequence[str] | None, *,
                  require_key: bool = False) -> list[str]:
    """Target genes: ``genes``, else the boolean ``.var[target_key]``, else all genes.

    With ``require_key``, a ``target_key`` absent from ``.var`` raises instead of selecting all genes.
    """
    if genes is not None:
        genes = [str(g) for g in genes]
        check_nonempty(len(genes), "genes")
        if len(set(genes)) != len(genes):
            dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
            msg = f"genes lists {len(dup)} gene(s) twice (e.g. {list(dup[:3])}); pass each gene once."
            raise ValueError(msg)
        missing = pd.Index(genes).difference(adata.var_names)
        if len(missing):
            msg = (f"{len(missing)} of {len(genes)} target genes are missing from var_names "
                   f"(e.g. {list(missing[:5])}; the table has e.g. {list(adata.var_names[:5])}).")
            raise KeyError(msg)
        return genes
    if target_key is None or (target_key not in adata.var and not require_key):
        check_nonempty(adata.n_vars, "The table's gene list (var_names)", "pass a table with the genes to predict.")
        return list(adata.var_names)
    assert_key_in(adata.var, target_key, where="table.var",
                  hint="Select target genes (si.pp.select_genes), pass genes=, or target_key=None for all genes.")
    mask = adata.var[target_key].to_numpy()
    if mask.dtype != bool:
        msg = f"table.var[{target_key!r}] must be a boolean gene mask, got dtype {mask.dtype}."
        raise TypeError(msg)
    check_nonempty(int(mask.sum()), f"table.var[{target_key!r}]", "select target genes first (si.pp.select_genes).")
    return list(adata.var_names[mask])


def target_counts(adata: AnnData, genes: Sequence[str], layer: str | None) -> np.ndarray:
    """Dense float32 raw counts of ``genes`` (checked finite, non-negative; warns when not integers)."""
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        msg = (f"var_names has {len(dup)} duplicated gene name(s) (e.g. {list(dup[:3])}); make them unique "
               "first with adata.var_names_make_unique().")
        raise ValueError(msg)
    src = counts_source(adata, layer)
    y = check_matrix(src[:, adata.var_names.get_indexer(list(genes))], "target counts", n_obs=adata.n_obs)
    if (y < 0).any():
        msg = "counts must be non-negative; pass the raw-count layer with layer=."
        raise ValueError(msg)
    if not np.allclose(y, np.round(y)):
        warn("target counts are not integers; the NB likelihood expects raw counts (pass layer=).")
    return y.astype(np.float32)


def log_library(adata: AnnData, library_size: bool | str, layer: str | None) -> np.ndarray:
    """Log of the per-spot library size: total counts of ``layer`` (``True``) or an ``.obs`` column."""
    if isinstance(library_size, str):
        assert_key_in(adata.obs, library_size, where="adata.obs", hint="Pass a library size or size-factor column.")
        lib = adata.obs[library_size].to_numpy(dtype=np.float64)
    else:
        lib = np.asarray(counts_source(adata, layer).sum(1)).ravel().astype(np.float64)
    if not np.all(np.isfinite(lib)) or np.any(lib <= 0):
        msg = "library sizes must be finite and > 0 for every spot; drop empty spots first."
        raise ValueError(msg)
    return np.log(lib)
