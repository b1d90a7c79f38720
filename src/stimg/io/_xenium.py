"""Xenium reader: cells, transcripts, boundaries and morphology images into SpatialData, lazily."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, LIBRARY_KEY, REGION_KEY, SPATIAL_KEY, TABLE_KEY
from .._logging import logger
from .._utils import warn
from ._tiff import tiff_level0


def read_xenium(
    path: str | os.PathLike,
    *,
    dataset_id: str | None = None,
    he_image: str | os.PathLike | None = None,
    he_alignment: str | os.PathLike | None = None,
    transcripts: bool = True,
    boundaries: bool = True,
    morphology: bool = True,
):
    """Read a 10x Xenium Onboard Analysis output folder into SpatialData.

    Reads the files every XOA (≥ 1.0) output has — ``experiment.xenium``, ``cells.parquet``,
    ``cell_feature_matrix.h5``, ``transcripts.parquet``, ``cell_boundaries.parquet``,
    ``nucleus_boundaries.parquet`` and the morphology OME-TIFF pyramids — without needing
    ``cells.zarr.zip`` (which :func:`spatialdata_io.xenium` requires). Coordinates stay in µm in the
    shapes and points, with a scale to the morphology image's pixels (coordinate systems
    ``dataset_id`` and ``'global'``). Images are lazy multiscale pyramids.

    Parameters
    ----------
    path
        The XOA output folder.
    dataset_id
        Section name (shapes element, region of the table); ``None`` uses ``experiment.xenium``'s
        region name, else the folder name.
    he_image
        A post-Xenium H&E image of the same section (TIFF/OME-TIFF), registered with
        ``he_alignment``.
    he_alignment
        The 3 × 3 alignment matrix CSV (Xenium Explorer's image alignment, H&E pixels →
        morphology pixels).
    transcripts
        Read ``transcripts.parquet`` as a lazy points element ``{id}_transcripts``.
    boundaries
        Read cell and nucleus polygons ``{id}_cell_boundaries``/``{id}_nucleus_boundaries``.
    morphology
        Read the morphology images (``morphology_focus/`` channels, else ``morphology.ome.tif``).

    Returns
    -------
    :class:`~spatialdata.SpatialData` with

    - table ``'table'``: raw counts of the gene-expression features per cell (``obs``: ``cell_id``,
      cell and nucleus areas in µm², transcript counts, ``region``/``spot_id``/``library_id``;
      ``obsm['spatial']``: centroids in µm);
    - circles ``{id}``: cell centroids, radius ``sqrt(cell_area / π)`` µm;
    - images ``{id}_morphology_focus`` (or ``{id}_morphology_mip``) and, when given,
      ``{id}_he_image``;
    - ``table.uns['spatial'][id]['scalefactors']['microns_per_pixel']`` from the file's pixel size.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.io.read_xenium("xenium_outs/")  # doctest: +SKIP
    >>> si.pp.pseudo_spots(sdata, size_um=100)  # doctest: +SKIP
    """
    import scanpy as sc
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    path = Path(path)
    spec_file = path / "experiment.xenium"
    if not spec_file.is_file():
        msg = f"{str(path)!r} is not a Xenium output folder: experiment.xenium not found."
        raise FileNotFoundError(msg)
    specs = json.loads(spec_file.read_text())
    ps = float(specs.get("pixel_size", 0) or 0)
    if ps <= 0:
        msg = f"{spec_file} has no positive 'pixel_size' (µm per morphology pixel)."
        raise ValueError(msg)
    dataset_id = dataset_id or str(specs.get("region_name") or path.name)
    for req in ("cells.parquet", "cell_feature_matrix.h5"):
        if not (path / req).is_file():
            msg = f"Xenium folder {str(path)!r} lacks {req}."
            raise FileNotFoundError(msg)
    if (he_image is None) != (he_alignment is None):
        msg = "Pass both he_image= and he_alignment= (the H&E and its Xenium Explorer alignment CSV), or neither."
        raise ValueError(msg)

    cells = pd.read_parquet(path / "cells.parquet")
    cells["cell_id"] = cells["cell_id"].astype(str)
    adata = sc.read_10x_h5(path / "cell_feature_matrix.h5", gex_only=True)
    adata.var_names_make_unique()
    cells = cells.set_index("cell_id", drop=False)
    missing = pd.Index(adata.obs_names).difference(cells.index)
    if len(missing):
        msg = f"{len(missing)} cells of cell_feature_matrix.h5 (e.g. {list(missing[:3])}) are not in cells.parquet."
        raise ValueError(msg)
    cells = cells.loc[adata.obs_names]
    n = adata.n_obs
    obs = cells.drop(columns=["segmentation_method"], errors="ignore").reset_index(drop=True)
    obs.index = adata.obs_names
    adata.obs = obs
    xy_um = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    if not np.isfinite(xy_um).all():
        msg = "cells.parquet has non-finite centroids."
        raise ValueError(msg)
    radius_um = np.sqrt(np.clip(cells["cell_area"].to_numpy(np.float64), 1e-6, None) / np.pi)
    adata.obsm[SPATIAL_KEY] = xy_um
    adata.obs[REGION_KEY] = pd.Categorical([dataset_id] * n)
    adata.obs[INSTANCE_KEY] = np.arange(n)
    adata.obs[LIBRARY_KEY] = pd.Categorical([dataset_id] * n)
    adata.X = adata.X.astype(np.float32)

    to_px = Scale([1.0 / ps, 1.0 / ps], axes=("x", "y"))
    cs = {dataset_id: to_px, "global": to_px}
    shapes = {dataset_id: ShapesModel.parse(xy_um, geometry=0, radius=radius_um, index=pd.RangeIndex(n),
                                            transformations=dict(cs))}
    if boundaries:
        import geopandas as gpd
        from shapely.geometry import Polygon

        for kind in ("cell", "nucleus"):
            f = path / f"{kind}_boundaries.parquet"
            if not f.is_file():
                continue
            b = pd.read_parquet(f)
            polys = {cid: Polygon(g[["vertex_x", "vertex_y"]].to_numpy()) for cid, g in b.groupby("cell_id", sort=False)}
            gdf = gpd.GeoDataFrame({"cell_id": list(polys)}, geometry=list(polys.values()))
            shapes[f"{dataset_id}_{kind}_boundaries"] = ShapesModel.parse(gdf, transformations=dict(cs))
    points = {}
    if transcripts and (path / "transcripts.parquet").is_file():
        import dask.dataframe as dd

        tx = dd.read_parquet(path / "transcripts.parquet")
        tx = tx.rename(columns={"x_location": "x", "y_location": "y"})
        if "feature_name" in tx.columns:  # known categories: spatialdata would otherwise scan the file later
            col = tx["feature_name"]
            col = col.astype(str).astype("category") if str(col.dtype) != "category" else col
            tx["feature_name"] = col.cat.as_known()
        points[f"{dataset_id}_transcripts"] = PointsModel.parse(tx, coordinates={"x": "x", "y": "y"},
                                                                feature_key="feature_name", transformations=dict(cs))
    images = {}
    if morphology:
        focus = sorted((path / "morphology_focus").glob("morphology_focus_*.ome.tif"))
        src, name = (focus[0], "morphology_focus") if focus else (path / "morphology.ome.tif", "morphology_mip")
        if src.is_file():
            arr, axes, n_levels = tiff_level0(src)
            if axes == "ZYX":  # z-stack: maximum-intensity projection, lazily
                arr = arr.max(axis=0, keepdims=True)
            images[f"{dataset_id}_{name}"] = Image2DModel.parse(
                arr, dims=("c", "y", "x"), scale_factors=[2] * (n_levels - 1) or None,
                chunks=(arr.shape[0], 1024, 1024),
                transformations={dataset_id: Identity(), "global": Identity()})
        else:
            warn(f"{str(path)!r} has no morphology image; reading cells and transcripts only.")
    if he_image is not None:
        from spatialdata.transformations import get_transformation, set_transformation
        from spatialdata_io import xenium_aligned_image

        he = xenium_aligned_image(he_image, he_alignment)
        tr = next(iter(get_transformation(he, get_all=True).values()))
        set_transformation(he, {dataset_id: tr, "global": tr}, set_all=True)
        images[f"{dataset_id}_he_image"] = he

    sf = {"microns_per_pixel": ps, "spot_diameter_um": float(2 * np.median(radius_um)),
          "spot_diameter_fullres": float(2 * np.median(radius_um) / ps)}
    adata.uns[SPATIAL_KEY] = {dataset_id: {"scalefactors": sf, "metadata": {
        "technology": "xenium", "panel": specs.get("panel_name"), "analysis_sw_version": specs.get("analysis_sw_version"),
        "unit_kind": "cell"}}}
    table = TableModel.parse(adata, region=dataset_id, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    logger.info("read Xenium %s: %d cells × %d genes, %.4f µm/px", dataset_id, n, adata.n_vars, ps)
    return SpatialData(images=images, shapes=shapes, points=points, tables={TABLE_KEY: table})
