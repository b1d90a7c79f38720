"""Spatial context: each spot's features pooled with its neighbours' within a radius in µm, per section.

Neighbours come from a k-d tree (:class:`scipy.spatial.cKDTree`) over the spot centres in µm, built
per section (never across sections); pooling is a sparse matrix product, so the cost grows
linearly in spots × neighbours. Aggregations are small plug-ins (:class:`ContextMethod`) in a
registry (:func:`register_context_method`, :func:`list_context_methods`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import log_added
from .._spatial import get_table, library_column, sections
from .._validate import assert_key_in, check_matrix

# provenance fields of the source features that stay true for pooled features (stimg.models._base)
_PROVENANCE = ("encoder", "encoder_identity", "weights", "pretrained", "patch_um", "patch_px", "stain")


@dataclass(frozen=True)
class ContextMethod:
    """How neighbours' features are pooled into a spot's context.

    Parameters
    ----------
    name
        Registry name.
    weight
        ``weight(distance_um, radius_um) -> weights`` of the neighbours within the radius
        (vectorised over a float32 array of distances).
    self_weight
        Weight of the spot itself in the pooled mean (``0``: neighbours only).
    prepend_self
        Put the spot's own features first, once, before the pooled blocks (one per radius).
    uses_distance
        Whether ``weight`` depends on the distances (``False`` lets a single-radius call skip
        computing them).
    """

    name: str
    weight: Callable[[np.ndarray, float], np.ndarray]
    self_weight: float = 1.0
    prepend_self: bool = False
    uses_distance: bool = True


def _uniform(dist: np.ndarray, radius: float) -> np.ndarray:
    return np.ones_like(dist)


def _gaussian(dist: np.ndarray, radius: float) -> np.ndarray:
    sigma = radius / 2.0  # the disc holds ±2σ
    return np.exp(-0.5 * (dist / np.float32(sigma)) ** 2)


# registered aggregations by name (register_context_method, list_context_methods)
CONTEXT_METHODS: dict[str, ContextMethod] = {}


def list_context_methods() -> list[str]:
    """Names of the registered :class:`ContextMethod` s (valid ``method=`` of :func:`spatial_context`).

    Examples
    --------
    >>> import stimg as si
    >>> si.pp.list_context_methods()[:3]
    ['mean', 'gaussian', 'concat']
    """
    return list(CONTEXT_METHODS)


def register_context_method(method: ContextMethod, *, overwrite: bool = False) -> ContextMethod:
    """Add an aggregation to :func:`spatial_context`'s registry.

    Parameters
    ----------
    method
        The :class:`ContextMethod`; its ``name`` becomes a valid ``method=``.
    overwrite
        Replace a method registered under the same name.

    Returns
    -------
    ``method``.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> inv = si.pp.ContextMethod("inverse", lambda dist, r: 1.0 / (1.0 + dist / 100.0))
    >>> _ = si.pp.register_context_method(inv, overwrite=True)
    """
    if not isinstance(method, ContextMethod):
        msg = f"Pass a stimg.pp.ContextMethod, got {type(method).__name__}."
        raise TypeError(msg)
    if method.name in CONTEXT_METHODS and not overwrite:
        msg = f"A context method named {method.name!r} is registered already; pass overwrite=True to replace it."
        raise ValueError(msg)
    CONTEXT_METHODS[method.name] = method
    return method


for _m in (ContextMethod("mean", _uniform, uses_distance=False),  # mean over the disc, the spot included
           ContextMethod("gaussian", _gaussian),  # Gaussian-weighted mean, σ = radius / 2
           ContextMethod("concat", _uniform, self_weight=0.0, prepend_self=True, uses_distance=False)):
    register_context_method(_m)


def _radii(radius_um: float | Sequence[float]) -> list[float]:
    radii = [radius_um] if np.isscalar(radius_um) else list(radius_um)
    if not radii:
        msg = "radius_um is empty; pass a radius in µm or a list of radii."
        raise ValueError(msg)
    out = []
    for r in radii:
        if isinstance(r, str) or not np.isfinite(r) or r < 0:
            msg = (f"radius_um must be a non-negative number of µm or a list of them, got {r!r}; to choose it by "
                   "cross-validation use si.tl.choose_spatial_context.")
            raise ValueError(msg)
        out.append(float(r))
    if len(set(out)) != len(out):
        msg = f"radius_um lists a radius twice: {out}."
        raise ValueError(msg)
    return out


def _resolve_method(method: str | ContextMethod) -> ContextMethod:
    if isinstance(method, ContextMethod):
        return method
    assert_key_in(CONTEXT_METHODS, method, where="the context methods",
                  hint="Register your own with si.pp.register_context_method.")
    return CONTEXT_METHODS[method]


def neighbour_pairs(xy_um: np.ndarray, radius_um: float, *,
                    distances: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pairs ``i < j`` of points within ``radius_um`` of each other and their distances (k-d tree).

    Parameters
    ----------
    xy_um
        ``(n, 2)`` coordinates in µm of one section.
    radius_um
        Search radius.
    distances
        Also return the distances (else ``None``).

    Returns
    -------
    ``(i, j, distance)``: int64, int64 and float32 arrays of equal length.
    """
    from scipy.spatial import cKDTree

    if radius_um <= 0 or len(xy_um) < 2:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32)
    tree = cKDTree(xy_um, balanced_tree=False, compact_nodes=False)  # 2-3× faster to build on spot grids
    p = tree.query_pairs(radius_um, output_type="ndarray")
    i, j = p[:, 0], p[:, 1]
    if not distances:
        return i, j, None
    dist = np.hypot(xy_um[i, 0] - xy_um[j, 0], xy_um[i, 1] - xy_um[j, 1]).astype(np.float32)
    return i, j, dist


def _pool(x: np.ndarray, i: np.ndarray, j: np.ndarray, dist: np.ndarray, radius: float,
          method: ContextMethod) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of the neighbours (and the spot, by ``self_weight``) within ``radius``; neighbour counts."""
    import scipy.sparse as sp

    n = x.shape[0]
    if dist is not None:
        keep = dist <= radius
        i, j, dist = i[keep], j[keep], dist[keep]
    w = (np.ones(len(i), np.float32) if not method.uses_distance
         else np.asarray(method.weight(dist, radius), dtype=np.float32))
    a = sp.csr_array((w, (i, j)), shape=(n, n))  # upper triangle; the graph is symmetric: A + Aᵀ
    total = np.float32(method.self_weight) * x
    total += a @ x
    total += a.T @ x
    count = np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    if method.uses_distance:
        norm = method.self_weight + np.bincount(i, w, minlength=n) + np.bincount(j, w, minlength=n)
    else:
        norm = method.self_weight + count.astype(np.float64)
    alone = norm <= 0  # no neighbour and no self weight: the spot's own features
    if alone.any():
        total[alone], norm[alone] = x[alone], 1.0
    total /= norm.astype(np.float32)[:, None]
    return total, count


def _source_params(table, key: str) -> dict[str, Any]:
    uns = table.uns.get(key)
    params = dict(uns.get("params", {})) if isinstance(uns, dict) else {}
    return {k: params[k] for k in _PROVENANCE if k in params}


@d.dedent
def spatial_context(
    data: Any,
    embedding_key: str = "X_efficientnet_lite0",
    *,
    radius_um: float | Sequence[float] = 500.0,
    method: str | ContextMethod = "concat",
    key_added: str | None = None,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    spot_diameter_um: float | None = None,
    n_jobs: int | None = None,
    inplace: bool = True,
) -> np.ndarray | None:
    """Add each spot's neighbourhood to its features: neighbours pooled within ``radius_um`` µm, per section.

    A spot's expression depends on more than the patch under it (TRIPLEX, Hist2ST, STFlow).
    By default (``method='concat'``, 500 µm) each spot keeps its own features and gains the mean
    of its neighbours' within 500 µm; on HER2ST this lifted both ridge and the NB ensemble, within
    and across patients (``benchmarks/bench_context_her2st.py``), whereas *replacing* the features
    by a wide mean (``'mean'``) loses each spot's own signal. Choose the radius by cross-validation
    on training sections with :func:`stimg.tl.choose_spatial_context`.

    Distances are physical (µm, from the section's µm per pixel), so a radius means the same on
    legacy ST (200 µm pitch), Visium (100 µm) and Visium HD bins. Spots of different sections are
    never neighbours. Neighbours come from a k-d tree and pooling is a sparse product: linear in
    spots × neighbours (a million Visium spots, 64 features: about 2.5 s of CPU at 250 µm, 7 s for the default
    500 µm ``concat``; ``benchmarks/bench_spatial_context.py``).

    Parameters
    ----------
    %(data)s
    embedding_key
        ``.obsm`` key of the features to pool (e.g. from :func:`stimg.pp.embed`).
    radius_um
        Radius in µm, or several radii (multi-scale): their pooled blocks are concatenated in
        order. Radius ``0`` pools nothing: the spot's own features for ``'mean'`` (so
        ``[0, 500]`` gives own + context), no block at all for ``'concat'``.
    method
        A registered :class:`ContextMethod` name (:func:`list_context_methods`) or the method itself:

        - ``'concat'`` (default): the spot's own features, then per radius the mean of its
          neighbours within it (its own features when it has none) — ``1 + len(radii)`` times
          the width;
        - ``'mean'``: per radius, the mean over the spots within it, the spot included (in
          place of its own features);
        - ``'gaussian'``: as ``'mean'``, weighted by ``exp(−d²/2σ²)`` with ``σ = radius/2``.
    key_added
        ``.obsm`` key of the result; ``None`` gives ``'<embedding_key>_context'``. An existing key
        not written by this function is never overwritten.
    %(table_key)s
    %(library_key)s
    spot_diameter_um
        Physical spot diameter, to derive µm per pixel when the table records neither
        ``microns_per_pixel`` nor ``spot_diameter_um`` in its scale factors.
    n_jobs
        Threads pooling sections in parallel; ``None`` uses one per CPU core (at most one per section).
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` the ``(n_obs, dim)`` float32 features. Otherwise ``None``, and the
    table gets

    - ``.obsm[key_added]``: the pooled features,
    - ``.uns[key_added]['params']``: source key, radii, method, median neighbours per pooled radius,
      and the source's encoder provenance (encoder, patch µm/px ...), so models trained on the
      pooled features check new data as they would the raw ones.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> adata = si.datasets.synthetic(64, 5, image=False, as_anndata=True)
    >>> si.pp.spatial_context(adata, "X_synthetic", radius_um=500)  # own 32 + context 32 features
    >>> adata.obsm["X_synthetic_context"].shape
    (64, 64)
    >>> si.pp.spatial_context(adata, "X_synthetic", radius_um=[250, 500], key_added="X_multiscale")
    >>> adata.obsm["X_multiscale"].shape
    (64, 96)
    """
    start = time.perf_counter()
    table = get_table(data, table_key)
    assert_key_in(table.obsm, embedding_key, where="table.obsm",
                  hint="Compute image features first, e.g. with si.pp.embed.")
    radii = _radii(radius_um)
    meth = _resolve_method(method)
    key_added = key_added or f"{embedding_key}_context"
    if key_added == embedding_key:
        msg = f"key_added must differ from embedding_key ({embedding_key!r}); the source features would be lost."
        raise ValueError(msg)
    if inplace:
        _refuse_foreign_key(table, key_added, "spatial_context")
    x = check_matrix(table.obsm[embedding_key], f"table.obsm[{embedding_key!r}]", n_obs=table.n_obs)
    x = x.astype(np.float32, copy=False)
    lib_key, _ = library_column(table, library_key)
    secs = sections(data, table_key=table_key, library_key=library_key, spot_diameter_um=spot_diameter_um,
                    need_image=False)
    if missing := [s.library_id for s in secs if s.mpp is None or not np.isfinite(s.mpp)]:
        msg = (f"No µm scale for sections {missing}: record scalefactors['microns_per_pixel'] (or "
               "'spot_diameter_fullres') in table.uns['spatial'][section], or pass spot_diameter_um=.")
        raise ValueError(msg)
    dim, first = x.shape[1], int(meth.prepend_self)
    pooled_radii = [r for r in radii if r > 0] if first else radii  # with the spot first, radius 0 adds nothing
    out = np.empty((table.n_obs, dim * (len(pooled_radii) + first)), np.float32)
    if first:
        out[:, :dim] = x
    dists = meth.uses_distance or len(pooled_radii) > 1

    def run(sec) -> list[np.ndarray]:
        idx = sec.obs_index
        rows = slice(idx[0], idx[-1] + 1) if len(idx) and idx[-1] - idx[0] + 1 == len(idx) else idx  # contiguous: a view
        r_max = max(pooled_radii, default=0.0)
        i, j, dist = neighbour_pairs(np.asarray(sec.xy, dtype=np.float64) * float(sec.mpp), r_max, distances=dists)
        counts = []
        for b, r in enumerate(pooled_radii, start=first):
            pooled, count = _pool(x[rows], i, j, dist, r, meth)
            out[rows, b * dim:(b + 1) * dim] = pooled
            counts.append(count)
        return counts

    workers = max(1, min(len(secs), (os.cpu_count() or 1) if n_jobs is None else int(n_jobs)))
    if workers == 1:
        per_sec = [run(sec) for sec in secs]
    else:  # the k-d tree queries and sparse products release the GIL
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as ex:
            per_sec = list(ex.map(run, secs))
    n_neigh = {r: [c[k] for c in per_sec] for k, r in enumerate(pooled_radii)}
    if not inplace:
        return out
    table.obsm[key_added] = out
    table.uns[key_added] = {"params": {
        **_source_params(table, embedding_key), "function": "spatial_context", "embedding_key": embedding_key,
        "radius_um": radii, "method": meth.name, "library_key": lib_key, "dim": int(out.shape[1]),
        "median_neighbours": [float(np.median(np.concatenate(n_neigh[r]))) for r in pooled_radii],
        "library_id": [s.library_id for s in secs],
    }}
    log_added("obsm", key_added, start)
    return None


def _written_here(table, key: str) -> bool:
    return _has_params(table, key) and table.uns[key]["params"].get("function") in ("spatial_context",
                                                                                    "combine_features")


def _refuse_foreign_key(table, key: str, writer: str) -> None:
    """Raise when ``table.obsm[key]`` exists but was not written by the context helpers (never overwrite it)."""
    if key in table.obsm and not _written_here(table, key):
        msg = f"table.obsm[{key!r}] exists and was not written by {writer}; pass another key_added or delete it first."
        raise ValueError(msg)


@d.dedent
def combine_features(
    data: Any,
    keys: Sequence[str],
    *,
    key_added: str,
    standardize: bool = False,
    table_key: str = TABLE_KEY,
    inplace: bool = True,
) -> np.ndarray | None:
    """Concatenate several ``.obsm`` feature blocks into one (multi-scale patches, encoders, context).

    TRIPLEX-style local + global views: embed the same spots at two patch sizes with
    :func:`stimg.pp.embed` (``patch_um=112`` and ``patch_um=336`` into two keys), optionally pool
    one with :func:`spatial_context`, and combine them here for any model that takes one
    ``.obsm`` key.

    Parameters
    ----------
    %(data)s
    keys
        ``.obsm`` keys, concatenated in this order (at least two).
    key_added
        ``.obsm`` key of the result; an existing key not written by stimg's feature helpers is
        never overwritten.
    standardize
        Scale each block to unit mean feature variance first, so blocks of different widths or
        scales weigh alike (the per-block scale is recorded in ``params``).
    %(table_key)s
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` the ``(n_obs, Σ dim)`` float32 features. Otherwise ``None``, and the
    table gets ``.obsm[key_added]`` and ``.uns[key_added]['params']`` (the keys, widths and each
    source's provenance).

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> adata = si.datasets.synthetic(64, 5, image=False, as_anndata=True)
    >>> si.pp.spatial_context(adata, "X_synthetic", radius_um=300, key_added="X_ctx")
    >>> si.pp.combine_features(adata, ["X_synthetic", "X_ctx"], key_added="X_both")
    >>> adata.obsm["X_both"].shape
    (64, 96)
    """
    start = time.perf_counter()
    table = get_table(data, table_key)
    keys = [keys] if isinstance(keys, str) else list(keys)
    if len(keys) < 2 or len(set(keys)) != len(keys):
        msg = f"keys must name at least two different .obsm entries, got {keys}."
        raise ValueError(msg)
    for k in keys:
        assert_key_in(table.obsm, k, where="table.obsm", hint="Compute the features first (si.pp.embed).")
    if key_added in keys:
        msg = f"key_added ({key_added!r}) must not be one of the combined keys."
        raise ValueError(msg)
    if inplace:
        _refuse_foreign_key(table, key_added, "stimg's feature helpers")
    blocks, scales = [], []
    for k in keys:
        b = check_matrix(table.obsm[k], f"table.obsm[{k!r}]", n_obs=table.n_obs).astype(np.float32)
        s = float(np.sqrt(b.var(0).mean())) if standardize else 1.0
        s = s if s > 0 else 1.0
        blocks.append(b / np.float32(s))
        scales.append(s)
    out = np.concatenate(blocks, axis=1)
    if not inplace:
        return out
    sources = {k: dict(table.uns[k]["params"]) if _has_params(table, k) else {} for k in keys}
    prov = [_source_params(table, k) for k in keys]
    common = {f: v for f, v in prov[0].items() if all(p.get(f) == v for p in prov)}
    table.obsm[key_added] = out
    table.uns[key_added] = {"params": {
        **common, "function": "combine_features", "keys": keys, "dims": [b.shape[1] for b in blocks],
        "standardize": bool(standardize), "scales": scales, "sources": sources, "dim": int(out.shape[1]),
    }}
    log_added("obsm", key_added, start)
    return None


def _has_params(table, key: str) -> bool:
    uns = table.uns.get(key)
    return isinstance(uns, dict) and isinstance(uns.get("params"), dict)
