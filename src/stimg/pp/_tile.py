"""Tile a slide without spots (H&E / WSI) into tissue tiles that behave like spots."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, LIBRARY_KEY, REGION_KEY, SPATIAL_KEY, TABLE_KEY, TISSUE_KEY
from .._logging import logger
from .._spatial import is_spatialdata
from .._validate import assert_key_in, check_fraction


def _as_yxc(img: Any) -> np.ndarray:
    """``(y, x, 3)`` uint8 view of an array given as ``(y, x, c)`` or ``(c, y, x)``."""
    arr = img.data if hasattr(img, "dims") else img  # xarray → dask/numpy
    if arr.ndim != 3:
        msg = f"Expected an RGB image of 3 dimensions, got shape {tuple(arr.shape)}."
        raise ValueError(msg)
    if arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = arr[:3]
        arr = np.moveaxis(np.asarray(arr), 0, -1)
    else:
        arr = np.asarray(arr)[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def _sdata_image(sdata: Any, image_key: str | None) -> str:
    from .._spatial import _scale0

    if image_key is not None:
        assert_key_in(sdata.images, image_key, where="sdata.images")
        return image_key
    if not len(sdata.images):
        msg = "The SpatialData object has no image to tile."
        raise KeyError(msg)
    return max(sdata.images, key=lambda k: int(np.prod(_scale0(sdata.images[k]).shape[-2:])))


def _levels(elem: Any) -> list[Any]:
    """``(c, y, x)`` DataArrays of an image element, finest first."""
    from spatialdata import get_pyramid_levels
    from xarray import DataTree

    return list(get_pyramid_levels(elem)) if isinstance(elem, DataTree) else [elem]


def _working_rgb(levels: list[Any], working_mpp: float, mpp: float) -> tuple[np.ndarray, float]:
    """RGB ``(y, x, 3)`` uint8 at about ``working_mpp`` µm/px, and its stride in full-resolution pixels.

    Reads only the coarsest of the pyramid ``levels`` (``(c, y, x)`` arrays, finest first) at least as
    fine as ``working_mpp``, area-averaged with dask.
    """
    import dask.array as da

    h0 = levels[0].shape[-2]
    want = max(1.0, working_mpp / mpp)  # full-resolution pixels per working pixel
    best = levels[0]
    for lv in levels:
        if h0 / lv.shape[-2] <= want * 1.001:
            best = lv
    ds = h0 / best.shape[-2]
    f = max(1, int(np.floor(want / ds)))
    arr = best[:3] if best.shape[0] > 3 else best
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr), chunks=(arr.shape[0], 4096, 4096))
    if f > 1:
        arr = da.coarsen(np.mean, arr.astype(np.float32), {1: f, 2: f}, trim_excess=True)
    small = np.moveaxis(np.asarray(arr.compute()), 0, -1)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8), ds * f


def _pyramid_coverage(levels: list[Any], xy: np.ndarray, tile_px: float, working_mpp: float,
                      mpp: float) -> tuple[np.ndarray, float]:
    """Tissue fraction of the square tiles of side ``tile_px`` centred at ``xy``, and the Otsu threshold.

    The tissue mask comes from the lazy slide's pyramid ``levels`` (:func:`_working_rgb`); with
    ``client=`` this runs in a dask worker, which reads the pixels.
    """
    small, stride = _working_rgb(levels, working_mpp, mpp)
    return _rgb_coverage(small, stride, xy, tile_px)


def _rgb_coverage(small: np.ndarray, stride: float, xy: np.ndarray, tile_px: float) -> tuple[np.ndarray, float]:
    """Tissue fraction of the tiles from a reduced RGB image (``stride`` full-resolution px per pixel); Otsu threshold."""
    from ._tissue import _coverage, mask_from_rgb

    mask, thr = mask_from_rgb(small)
    return _coverage(mask, xy / stride, tile_px / 2 / stride, square=True), thr


def tile_image(
    image: Any,
    tile_um: float = 112.0,
    *,
    mpp: float | None = None,
    min_tissue: float = 0.5,
    stride_um: float | None = None,
    image_key: str | None = None,
    library_id: str = "tiles",
    genes: Sequence[str] | None = None,
    working_mpp: float = 4.0,
    as_spatialdata: bool | None = None,
    client: Any = None,
):
    """Cut a slide without spots into square tissue tiles that flow through :func:`~stimg.pp.embed` and prediction.

    The image is covered by a grid of ``tile_um`` µm tiles (step ``stride_um``); tissue is detected
    by Otsu thresholding of saturation (:func:`stimg.pp.tissue_mask`'s method) at ``working_mpp``
    µm/px, and tiles with at least ``min_tissue`` tissue are kept. A SpatialData input (e.g. from
    :func:`stimg.io.read_wsi`) is tiled lazily: only the coarsest pyramid level at least as fine as
    ``working_mpp`` is read (area-averaged) for the tissue mask, and the output references the
    slide's image element without reading or copying its pixels. Each tile becomes a "spot" whose
    centre is the tile centre and whose diameter is the tile side, so ``si.pp.embed(tiles,
    patch_um=tile_um)`` embeds exactly the tile (STImage's use case: predicting expression on
    TCGA slides).

    Parameters
    ----------
    image
        A ``(y, x, 3)`` or ``(3, y, x)`` uint8 array, a path to an image file, or a
        :class:`~spatialdata.SpatialData` holding the image.
    tile_um
        Side of a tile in µm.
    mpp
        µm per pixel of the image (full resolution). ``None``: read from a SpatialData made by
        :func:`stimg.io.read_wsi` (``sdata.attrs['stimg_wsi']['mpp']``).
    min_tissue
        Minimum tissue fraction of a kept tile (0 keeps all tiles).
    stride_um
        Step between tile centres in µm; ``None`` gives non-overlapping tiles (``tile_um``).
    image_key
        Image element of a SpatialData input; ``None`` takes the largest.
    library_id
        Name of the tiled section (``obs['library_id']`` and, for SpatialData, the new shapes element).
    genes
        Gene names for the table's (empty, all-zero sparse) ``X``, so that a model's predictions for
        these genes can be written by :func:`stimg.tl.predict_expression`.
    working_mpp
        Resolution of the tissue mask (µm/px).
    as_spatialdata
        Return SpatialData (image, circles inscribed in the tiles, table) instead of AnnData;
        ``None``: SpatialData for SpatialData input, else AnnData.
    client
        A :class:`dask.distributed.Client`: a lazy slide (SpatialData output from an image on disk,
        e.g. :func:`stimg.io.read_wsi` or a zarr-backed SpatialData) is read and masked by a task
        in a worker, so the driver never holds its pixels (docs: "Beyond one machine"); the tiles are the
        same as without it. Images already in memory are masked where they are. ``None``: this process.

    Returns
    -------
    A new AnnData with ``obsm['spatial']`` (tile centres, full-resolution pixels),
    ``obs['library_id']``, ``obs['array_row'/'array_col']`` (grid indices),
    ``obs['tissue_coverage']``, ``uns['spatial'][library_id]`` (the full image under
    ``'fullres'`` without a copy, a ``'hires'`` copy ≤ 2000 px, scale factors with
    ``microns_per_pixel``) and ``uns['tile_image']['params']``; or a SpatialData with the image,
    circles ``library_id`` and table ``'table'``.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> img = np.full((1000, 1200, 3), 240, np.uint8)
    >>> img[200:800, 300:900] = (180, 90, 160)  # "tissue"
    >>> tiles = si.pp.tile_image(img, 112, mpp=0.5)
    >>> tiles.n_obs, tiles.obsm["spatial"].shape[1]
    (8, 2)

    A whole-slide image tiled by a dask worker, then embedded through the same cluster:

    >>> from dask.distributed import Client  # doctest: +SKIP
    >>> client = Client(n_workers=2, threads_per_worker=1)  # doctest: +SKIP
    >>> tiles = si.pp.tile_image(si.io.read_wsi("slide.svs"), 112, client=client)  # doctest: +SKIP
    >>> si.pp.embed(tiles, patch_um=112, client=client)  # doctest: +SKIP
    """
    from ..io._convert import HIRES_MAX_SIDE
    from ..io._image import downsample, read_image
    from ..io._wsi import WSI_ATTRS

    start = time.perf_counter()
    sdata = image if is_spatialdata(image) else None
    if mpp is None:
        wsi = getattr(sdata, "attrs", {}).get(WSI_ATTRS) if sdata is not None else None
        if wsi is None:
            msg = ("mpp (µm per pixel of the image) is unknown: pass mpp=, or read the slide with si.io.read_wsi, "
                   "which records it.")
            raise ValueError(msg)
        mpp = wsi["mpp"]
        image_key = image_key or wsi.get("image_key")
    for name, v in (("tile_um", tile_um), ("mpp", mpp), ("working_mpp", working_mpp)):
        if v is None or not (np.isfinite(v) and v > 0):
            msg = f"{name} must be a positive number, got {v!r}."
            raise ValueError(msg)
    if stride_um is not None and not (np.isfinite(stride_um) and stride_um > 0):
        msg = f"stride_um must be a positive number of µm, got {stride_um!r}."
        raise ValueError(msg)
    check_fraction(min_tissue, "min_tissue")
    if client is not None:
        from ._distributed import check_client

        check_client(client)
    to_sd = (sdata is not None) if as_spatialdata is None else bool(as_spatialdata)
    img = None
    if sdata is not None:
        image_key = _sdata_image(sdata, image_key)
        elem = sdata.images[image_key]
        h, w = _levels(elem)[0].shape[-2:]
        if not to_sd:  # an AnnData keeps the full image in memory
            img = _as_yxc(_levels(elem)[0])
    elif isinstance(image, str | os.PathLike):
        img = read_image(image)
    else:
        img = _as_yxc(np.asarray(image))
    if img is not None:
        h, w = img.shape[:2]
    tile_px = tile_um / mpp
    step_px = (stride_um if stride_um is not None else tile_um) / mpp
    if tile_px < 2 or tile_px > min(h, w):
        msg = (f"A {tile_um} µm tile is {tile_px:.1f} px at {mpp} µm/px, but the image is {w}×{h} px; "
               "check mpp and tile_um.")
        raise ValueError(msg)
    nx, ny = int(np.floor((w - tile_px) / step_px)) + 1, int(np.floor((h - tile_px) / step_px)) + 1
    col, row = np.meshgrid(np.arange(nx), np.arange(ny))
    col, row = col.ravel(), row.ravel()
    xy = np.c_[tile_px / 2 + col * step_px, tile_px / 2 + row * step_px]
    if img is None:  # lazy slide: mask from the pyramid, in a dask worker when the pixels are on disk
        from ._distributed import _in_memory, run_tasks

        levels = [lv.data if hasattr(lv, "data") else lv for lv in _levels(elem)]
        if client is not None and not _in_memory(levels[0]):
            task = ((levels, xy, tile_px, working_mpp, mpp), {})
            cov, thr = run_tasks(client, _pyramid_coverage, [task], desc="Tiling (dask)", progress=False)[0]
        else:
            cov, thr = _pyramid_coverage(levels, xy, tile_px, working_mpp, mpp)
    else:
        stride = max(1, int(round(working_mpp / mpp)))
        cov, thr = _rgb_coverage(img[::stride, ::stride], stride, xy, tile_px)
    keep = cov >= min_tissue
    if not keep.any():
        msg = (f"No tile has ≥ {min_tissue:.0%} tissue (best {cov.max():.0%}); lower min_tissue or check the image "
               "and mpp.")
        raise ValueError(msg)
    xy, col, row, cov = xy[keep], col[keep], row[keep], cov[keep]
    n = len(xy)
    names = [f"{library_id}_{r}_{c}" for r, c in zip(row, col, strict=True)]

    import anndata as ad
    import scipy.sparse as sp

    gene_names = pd.Index([] if genes is None else [str(g) for g in genes])
    if gene_names.has_duplicates:
        msg = "genes contains duplicates."
        raise ValueError(msg)
    obs = pd.DataFrame({LIBRARY_KEY: pd.Categorical([library_id] * n), "array_row": row, "array_col": col,
                        TISSUE_KEY: cov}, index=pd.Index(names))
    adata = ad.AnnData(X=sp.csr_matrix((n, len(gene_names)), dtype=np.float32), obs=obs,
                       var=pd.DataFrame(index=gene_names))
    adata.obsm[SPATIAL_KEY] = xy.astype(np.float64)
    sf = {"microns_per_pixel": float(mpp), "spot_diameter_fullres": float(tile_px), "spot_diameter_um": float(tile_um)}
    params = {"tile_um": float(tile_um), "stride_um": None if stride_um is None else float(stride_um), "mpp": float(mpp),
              "min_tissue": float(min_tissue), "working_mpp": float(working_mpp), "otsu_saturation_threshold": thr,
              "n_tiles_grid": int(nx * ny), "image_key": image_key}
    adata.uns["tile_image"] = {"params": params}
    logger.info("kept %d of %d tiles of %g µm with ≥ %g%% tissue (%.1fs)", n, nx * ny, tile_um, 100 * min_tissue,
                time.perf_counter() - start)
    if not to_sd:
        hires, scalef = downsample(img, HIRES_MAX_SIDE)
        adata.uns[SPATIAL_KEY] = {library_id: {"images": {"fullres": img, "hires": hires},
                                               "scalefactors": {**sf, "tissue_hires_scalef": float(scalef)},
                                               "metadata": {"source": "stimg.pp.tile_image"}}}
        return adata

    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, get_transformation

    if sdata is not None:
        img_elem = sdata.images[image_key]
        base_t = get_transformation(_levels(img_elem)[0], get_all=True)  # scale 0 of a pyramid
        base_t = {k: v for k, v in base_t.items()} or {library_id: Identity()}
    else:
        image_key = f"{library_id}_full_image"
        base_t = {library_id: Identity(), "global": Identity()}
        img_elem = Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                      transformations=dict(base_t), chunks=(3, 4096, 4096))
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(n, tile_px / 2.0), index=pd.RangeIndex(n),
                               transformations=dict(base_t))
    adata.obs[REGION_KEY] = pd.Categorical([library_id] * n)
    adata.obs[INSTANCE_KEY] = np.arange(n)
    adata.uns[SPATIAL_KEY] = {library_id: {"scalefactors": sf, "metadata": {"source": "stimg.pp.tile_image"}}}
    table = TableModel.parse(adata, region=library_id, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(images={image_key: img_elem}, shapes={library_id: shapes}, tables={TABLE_KEY: table})
