"""Visium HD reader: Space Ranger binned outputs (2/8/16 µm squares) into SpatialData, lazily."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, LIBRARY_KEY, REGION_KEY, SPATIAL_KEY
from .._logging import logger

_BIN_DIR = re.compile(r"square_(\d{3})um$")


def _bin_dirs(path: Path) -> dict[int, Path]:
    """``{bin µm: folder}`` of every ``square_XXXum`` folder at or under ``path``."""
    if _BIN_DIR.search(path.name):
        return {int(_BIN_DIR.search(path.name).group(1)): path}
    root = path / "binned_outputs" if (path / "binned_outputs").is_dir() else path
    return {int(m.group(1)): d for d in sorted(root.iterdir()) if d.is_dir() and (m := _BIN_DIR.search(d.name))}


def _read_counts(d: Path):
    import scanpy as sc

    if (d / "filtered_feature_bc_matrix.h5").is_file():
        return sc.read_10x_h5(d / "filtered_feature_bc_matrix.h5", gex_only=True)
    if (d / "filtered_feature_bc_matrix").is_dir():
        return sc.read_10x_mtx(d / "filtered_feature_bc_matrix", gex_only=True)
    msg = f"{str(d)!r} has no filtered_feature_bc_matrix(.h5)."
    raise FileNotFoundError(msg)


def read_visium_hd(
    path: str | os.PathLike,
    *,
    bin_size: int | list[int] | None = None,
    dataset_id: str | None = None,
    fullres_image_file: str | os.PathLike | None = None,
):
    """Read Visium HD binned outputs (Space Ranger ``binned_outputs/square_XXXum``) into SpatialData.

    Each bin size becomes one table ``square_XXXum`` linked to circles ``{id}_square_XXXum``
    (centre of each bin, diameter = the bin's side) in full-resolution pixels; images are the
    Space Ranger hires/lowres PNGs (scaled into the full-resolution frame) and, when given, the
    full-resolution H&E as a lazy pyramid. Reads what every Space Ranger ≥ 3.0 HD output has
    (``filtered_feature_bc_matrix``, ``spatial/tissue_positions.parquet``,
    ``spatial/scalefactors_json.json``); a folder of one bin size is accepted too.

    Parameters
    ----------
    path
        The ``outs`` folder, its ``binned_outputs`` folder, or one ``square_XXXum`` folder.
    bin_size
        Bin sizes in µm to read (e.g. ``8`` or ``[8, 16]``); ``None`` reads all present.
    dataset_id
        Section name (prefix of shapes and images); ``None`` uses the ``outs`` folder's parent name.
    fullres_image_file
        The full-resolution H&E (TIFF/OME-TIFF/BTF), read lazily.

    Returns
    -------
    :class:`~spatialdata.SpatialData` with tables ``square_XXXum`` (raw counts; ``obs``: ``in_tissue``,
    ``array_row``/``array_col``, ``region``/``spot_id``/``library_id``; ``uns['spatial']`` with
    ``microns_per_pixel`` and ``bin_size_um``), circles and images.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.io.read_visium_hd("outs/", bin_size=8)  # doctest: +SKIP
    >>> si.pp.pseudo_spots(sdata, table_key="square_008um", size_um=55, shape="hex")  # doctest: +SKIP
    """
    from PIL import Image
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    path = Path(path)
    if not path.is_dir():
        msg = f"Visium HD folder {str(path)!r} does not exist or is not a folder."
        raise FileNotFoundError(msg)
    found = _bin_dirs(path)
    if not found:
        msg = f"No binned_outputs/square_XXXum folder under {str(path)!r}; pass Space Ranger's HD 'outs' folder."
        raise FileNotFoundError(msg)
    want = sorted(found) if bin_size is None else ([bin_size] if isinstance(bin_size, int) else list(bin_size))
    if missing := [b for b in want if b not in found]:
        msg = f"bin sizes {missing} µm not found; available: {sorted(found)}."
        raise ValueError(msg)
    if dataset_id is None:
        outs = path if (path / "binned_outputs").is_dir() else (path.parent if path.name == "binned_outputs"
                                                                   else path.parent.parent)
        dataset_id = outs.name if outs.name != "outs" else outs.parent.name
    tables, shapes, images = {}, {}, {}
    cs = {dataset_id: Identity(), "global": Identity()}
    for b in want:
        d = found[b]
        sf = json.loads((d / "spatial" / "scalefactors_json.json").read_text())
        mpp = float(sf.get("microns_per_pixel", 0) or 0)
        if mpp <= 0:
            msg = f"{d / 'spatial' / 'scalefactors_json.json'} has no microns_per_pixel."
            raise ValueError(msg)
        adata = _read_counts(d)
        adata.var_names_make_unique()
        pos = pd.read_parquet(d / "spatial" / "tissue_positions.parquet").set_index("barcode")
        missing_bc = pd.Index(adata.obs_names).difference(pos.index)
        if len(missing_bc):
            msg = f"{len(missing_bc)} barcodes of the count matrix (e.g. {list(missing_bc[:3])}) have no position."
            raise ValueError(msg)
        pos = pos.loc[adata.obs_names]
        name = f"{dataset_id}_square_{b:03d}um"
        n = adata.n_obs
        xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
        adata.obs = pos[["in_tissue", "array_row", "array_col"]].copy()
        adata.obs[REGION_KEY] = pd.Categorical([name] * n)
        adata.obs[INSTANCE_KEY] = np.arange(n)
        adata.obs[LIBRARY_KEY] = pd.Categorical([name] * n)
        adata.obsm[SPATIAL_KEY] = xy
        adata.X = adata.X.astype(np.float32)
        side_px = float(b) / mpp
        shapes[name] = ShapesModel.parse(xy, geometry=0, radius=np.full(n, side_px / 2), index=pd.RangeIndex(n),
                                         transformations=dict(cs))
        sf_out = {**sf, "microns_per_pixel": mpp, "bin_size_um": float(b), "spot_diameter_um": float(b),
                  "spot_diameter_fullres": side_px}
        adata.uns[SPATIAL_KEY] = {name: {"scalefactors": sf_out, "metadata": {"technology": "visium_hd",
                                                                               "unit_kind": "bin", "shape": "square"}}}
        tables[f"square_{b:03d}um"] = TableModel.parse(adata, region=name, region_key=REGION_KEY,
                                                       instance_key=INSTANCE_KEY)
        for res in ("hires", "lowres"):
            f = d / "spatial" / f"tissue_{res}_image.png"
            key = f"{dataset_id}_{res}_image"
            if f.is_file() and key not in images and f"tissue_{res}_scalef" in sf:
                img = np.asarray(Image.open(f).convert("RGB"))
                s = 1.0 / float(sf[f"tissue_{res}_scalef"])
                t = Scale([s, s], axes=("x", "y"))
                images[key] = Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                                 transformations={dataset_id: t, "global": t})
        logger.info("read Visium HD %s: %d bins of %d µm × %d genes, %.4f µm/px", name, n, b, adata.n_vars, mpp)
    if fullres_image_file is not None:
        from ._tiff import tiff_level0

        arr, _, n_levels = tiff_level0(fullres_image_file)
        images[f"{dataset_id}_full_image"] = Image2DModel.parse(
            arr, dims=("c", "y", "x"), c_coords=["r", "g", "b"][: arr.shape[0]], scale_factors=[2] * (n_levels - 1) or None,
            chunks=(arr.shape[0], 1024, 1024), transformations=dict(cs))
    return SpatialData(images=images, shapes=shapes, tables=tables)
