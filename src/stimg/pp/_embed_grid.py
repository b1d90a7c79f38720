"""Image features shared by many small units: embed a tile grid once, give each unit its tile's features."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import INSTANCE_KEY, LIBRARY_KEY, REGION_KEY, SPATIAL_KEY, TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._spatial import get_table, is_spatialdata, native_units, sections
from ._patches import check_spots_on_image


def _nearest(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One node per unit (``xy`` in grid units): ``(n, 1, 2)`` node indices and ``(n, 1)`` weights."""
    return np.rint(xy).astype(np.int64)[:, None, :], np.ones((len(xy), 1))


def _bilinear(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The four surrounding nodes and their bilinear weights."""
    i0 = np.floor(xy).astype(np.int64)
    f = xy - i0
    corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    nodes = i0[:, None, :] + corners[None]
    w = np.stack([(1 - f[:, 0]) * (1 - f[:, 1]), f[:, 0] * (1 - f[:, 1]), (1 - f[:, 0]) * f[:, 1], f[:, 0] * f[:, 1]], 1)
    return nodes, w


_INTERPOLATIONS = {"nearest": _nearest, "bilinear": _bilinear}


@d.dedent
def embed_grid(
    data: Any,
    model: Any = "efficientnet_lite0",
    *,
    stride_um: float | None = None,
    patch_um: float = 112.0,
    interpolation: str = "bilinear",
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    key_added: str | None = None,
    inplace: bool = True,
    **embed_kwargs: Any,
) -> np.ndarray | None:
    """Embed a regular grid of patches once and give every unit its grid features (cells, HD bins).

    One ``patch_um`` patch per grid node at spacing ``stride_um``, only where units are, through
    :func:`stimg.pp.embed` (same encoders, cache, devices, progress); each unit then gets the
    features of its nearest node or the bilinear blend of the four around it. Cost grows with the
    tissue area / ``stride_um²`` instead of the number of units: for 8 µm Visium HD bins and the
    default stride (56 µm for 112 µm patches) that is ≈ 49× fewer patches than one per bin.

    **Trade-off.** Features vary on the scale of ``stride_um``, not of each unit: two bins in the
    same node's reach get (nearly) the same features. A per-unit patch (:func:`stimg.pp.embed` on
    the units) centres every patch exactly, which matters only when units are at least a stride
    apart — use it for spots and pseudo-spots, and the grid for units much smaller than a patch.

    Parameters
    ----------
    %(data)s
    model
        Encoder: a registry name, a timm name or a module (see :func:`stimg.pp.embed`).
    stride_um
        Grid spacing in µm; ``None`` uses ``patch_um / 2``. Must be ≤ ``patch_um`` so that
        patches cover the tissue.
    patch_um
        Physical patch side in µm.
    interpolation
        ``'bilinear'`` (four nodes) or ``'nearest'``.
    %(table_key)s
    %(library_key)s
    key_added
        ``.obsm`` key; ``None`` gives ``'X_<encoder name>'``.
    %(inplace)s
    **embed_kwargs
        Passed to :func:`stimg.pp.embed` (``patch_px``, ``batch_size``, ``accelerator``, ``cache_dir``,
        ``image_key``, ``stain``, ``progress`` ...).

    Returns
    -------
    With ``inplace=False`` the ``(n_obs, dim)`` float32 features; else ``None`` and the table gets
    ``.obsm[key_added]`` and ``.uns[key_added]['params']`` (the encoder's parameters plus
    ``grid_stride_um``, ``interpolation``, ``n_patches`` and ``n_units``).

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.io.read_visium_hd("outs/", bin_size=8)  # doctest: +SKIP
    >>> si.pp.embed_grid(sdata, table_key="square_008um", stride_um=56)  # doctest: +SKIP
    """
    from ._embed import embed

    start = time.perf_counter()
    if interpolation not in _INTERPOLATIONS:
        msg = f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}."
        raise ValueError(msg)
    stride = float(patch_um) / 2 if stride_um is None else float(stride_um)
    if not np.isfinite(stride) or stride <= 0 or stride > float(patch_um):
        msg = f"stride_um must be in (0, patch_um={patch_um}] so that patches cover the tissue, got {stride_um!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    if table.n_obs == 0:
        msg = "The table has no spots to embed; check the filtering that produced it."
        raise ValueError(msg)
    units = native_units(data, table, library_key)
    # the units themselves must lie on their images (only grid nodes past the edge are moved onto it)
    check_spots_on_image(sections(data, table_key=table_key, library_key=library_key,
                                  image_key=embed_kwargs.get("image_key")))

    weights, node_xy, node_lib, offset = [], [], [], 0
    for u in units:
        nodes, w = _INTERPOLATIONS[interpolation](u.xy * u.um_per_unit / stride)
        rows = np.repeat(np.arange(len(u.obs_index)), nodes.shape[1])
        keep = w.ravel() > 0  # a unit on a grid line needs no patch beyond it
        uniq, inv = np.unique(nodes.reshape(-1, 2)[keep], axis=0, return_inverse=True)
        weights.append((u, w.ravel()[keep], rows[keep], offset + inv.ravel()))
        node_xy.append(uniq * stride / u.um_per_unit)
        node_lib += [u.library_id] * len(uniq)
        offset += len(uniq)
    n_nodes = offset
    node_xy_all = np.concatenate(node_xy)
    grid = _grid_data(data, table, units, node_xy_all, np.asarray(node_lib), table_key)
    clipped = _inside_images(grid, node_xy_all, embed_kwargs.get("image_key"))
    if clipped is not None:  # nodes beyond the image edge moved onto it (their patch is padded as any edge patch)
        grid = _grid_data(data, table, units, clipped, np.asarray(node_lib), table_key)
    embed(grid, model, patch_um=patch_um, key_added="X_grid", inplace=True, **embed_kwargs)
    gt = get_table(grid)
    node_feats = np.asarray(gt.obsm["X_grid"], dtype=np.float32)
    params = dict(gt.uns["X_grid"]["params"])
    out = np.full((table.n_obs, node_feats.shape[1]), np.nan, dtype=np.float32)
    for u, w, rows, cols in weights:
        W = sp.csr_matrix((w, (rows, cols)), shape=(len(u.obs_index), n_nodes))
        out[u.obs_index] = np.asarray(W @ node_feats, dtype=np.float32)
    logger.info("embedded %d units from %d grid patches (stride %.3g µm, %s)", table.n_obs, n_nodes, stride, interpolation)
    if not inplace:
        return out
    key_added = key_added or f"X_{params['encoder']}"
    table.obsm[key_added] = out
    table.uns[key_added] = {"params": {**params, "grid_stride_um": stride, "interpolation": interpolation,
                                       "n_patches": int(n_nodes), "n_units": int(table.n_obs)}}
    log_added("obsm", key_added, start)
    return None


def _inside_images(grid: Any, node_xy: np.ndarray, image_key: Any) -> np.ndarray | None:
    """Node centres clipped to their section image (in the image's pixel frame), or ``None`` if all lie on it.

    A unit near the tissue edge interpolates from a node up to one stride beyond it, which can fall
    just outside the image. The native → image-pixel map is affine (scale and offset), so it is fitted
    on the nodes, the off-image nodes are clipped in pixels and mapped back.
    """
    out, moved = node_xy.astype(np.float64), False
    for s in sections(grid, table_key=TABLE_KEY, image_key=image_key):
        if s.image is None:
            continue
        _, h, w = s.image.shape
        dst = np.asarray(s.xy[:, :2], dtype=np.float64)
        off = (dst < 0).any(1) | (dst[:, 0] > w - 1) | (dst[:, 1] > h - 1)
        if not off.any():
            continue
        rows = np.asarray(s.obs_index)
        src = np.c_[node_xy[rows, :2], np.ones(len(rows))]
        aff, *_ = np.linalg.lstsq(src, dst, rcond=None)  # (3, 2): dst = [x, y, 1] @ aff
        inside = np.clip(dst[off], 1e-3, [w - 1 - 1e-3, h - 1 - 1e-3])  # a hair inside: the round trip is not exact
        out[rows[off], :2] = np.linalg.solve(aff[:2].T, (inside - aff[2]).T).T
        moved = True
    return out if moved else None


def _grid_data(data: Any, table: AnnData, units, node_xy: np.ndarray, node_lib: np.ndarray, table_key: str):
    """A throw-away data object whose 'spots' are the grid nodes, sharing ``data``'s images."""
    n = len(node_xy)
    obs = pd.DataFrame({LIBRARY_KEY: pd.Categorical(node_lib, categories=[u.library_id for u in units])},
                       index=[f"node{i}" for i in range(n)])
    grid = AnnData(X=sp.csr_matrix((n, 0), dtype=np.float32), obs=obs)
    grid.obsm[SPATIAL_KEY] = node_xy
    grid.uns[SPATIAL_KEY] = dict(table.uns.get(SPATIAL_KEY, {}))
    if not is_spatialdata(data):
        return grid
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    shapes = {}
    grid.obs[REGION_KEY] = pd.Categorical(node_lib, categories=[u.library_id for u in units])
    grid.obs[INSTANCE_KEY] = 0
    for u in units:
        m = node_lib == u.library_id
        grid.obs.loc[m, INSTANCE_KEY] = np.arange(int(m.sum()))
        d_um = float(table.uns[SPATIAL_KEY][u.library_id]["scalefactors"]["spot_diameter_um"])
        r = d_um / 2 / u.um_per_unit  # the units' own size: sections() then finds the same µm/px
        shapes[u.library_id] = ShapesModel.parse(node_xy[m], geometry=0, radius=np.full(int(m.sum()), r),
                                                 index=pd.RangeIndex(int(m.sum())), transformations=dict(u.transformations))
    grid = TableModel.parse(grid, region=[u.library_id for u in units], region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(images=dict(data.images), shapes=shapes, tables={TABLE_KEY: grid})
