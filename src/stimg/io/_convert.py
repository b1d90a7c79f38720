"""Assemble sections (counts + spot centres + image) into SpatialData or AnnData."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import INSTANCE_KEY, LIBRARY_KEY, REGION_KEY, SPATIAL_KEY, TABLE_KEY

HIRES_MAX_SIDE = 2000


@dataclass
class SectionData:
    """One section: a table whose ``obsm['spatial']`` is in pixels of ``image`` (if any)."""

    library_id: str
    adata: AnnData
    image: np.ndarray | None  # (y, x, 3) uint8
    mpp: float  # µm per pixel of ``image`` (and of obsm['spatial'])
    spot_diameter_um: float
    metadata: dict = field(default_factory=dict)

    @property
    def spot_diameter_px(self) -> float:
        return self.spot_diameter_um / self.mpp


def _scalefactors(sec: SectionData, hires_scalef: float | None = None) -> dict:
    sf = {
        "spot_diameter_fullres": float(sec.spot_diameter_px),
        "microns_per_pixel": float(sec.mpp),
        "spot_diameter_um": float(sec.spot_diameter_um),
    }
    if hires_scalef is not None:
        sf["tissue_hires_scalef"] = float(hires_scalef)
    return sf


def _concat_tables(sections: list[SectionData]) -> AnnData:
    import anndata as ad

    for s in sections:
        s.adata.obs[LIBRARY_KEY] = s.library_id
    if len(sections) == 1:
        table = sections[0].adata
    else:
        table = ad.concat([s.adata for s in sections], join="outer", merge="same", fill_value=0)
    table.obs[LIBRARY_KEY] = pd.Categorical(table.obs[LIBRARY_KEY], categories=[s.library_id for s in sections])
    return table


def to_anndata(sections: list[SectionData]) -> AnnData:
    """AnnData with scanpy's ``.uns['spatial'][library_id]`` (hires image ≤ 2000 px)."""
    from ._image import downsample

    table = _concat_tables(sections)
    table.uns[SPATIAL_KEY] = {}
    for s in sections:
        entry: dict = {"metadata": dict(s.metadata)}
        if s.image is not None:
            hires, scalef = downsample(s.image, HIRES_MAX_SIDE)
            entry["images"] = {"hires": hires}
            entry["scalefactors"] = _scalefactors(s, scalef)
        else:
            entry["images"] = {}
            entry["scalefactors"] = _scalefactors(s)
        table.uns[SPATIAL_KEY][s.library_id] = entry
    return table


def to_spatialdata(sections: list[SectionData]):
    """SpatialData: image ``{id}_full_image``, circles ``{id}`` and the linked table ``'table'``.

    All elements of a section live in the coordinate system ``{id}`` (pixels of the full image),
    also registered as ``'global'`` when there is a single section.
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    images, shapes = {}, {}
    for s in sections:
        cs = {s.library_id: Identity()}
        if len(sections) == 1:
            cs["global"] = Identity()
        xy = np.asarray(s.adata.obsm[SPATIAL_KEY], dtype=np.float64)
        n = xy.shape[0]
        s.adata.obs[REGION_KEY] = s.library_id
        s.adata.obs[INSTANCE_KEY] = np.arange(n)
        shapes[s.library_id] = ShapesModel.parse(
            xy, geometry=0, radius=np.full(n, s.spot_diameter_px / 2.0), index=pd.RangeIndex(n), transformations=cs
        )
        if s.image is not None:
            import dask.array as da

            # chunk once here (parse would otherwise chunk and rechunk again, copying twice)
            arr = da.from_array(np.moveaxis(s.image, -1, 0), chunks=(3, 4096, 4096))
            images[f"{s.library_id}_full_image"] = Image2DModel.parse(
                arr, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=dict(cs),
            )
    table = _concat_tables(sections)
    table.obs[REGION_KEY] = pd.Categorical(table.obs[REGION_KEY].astype(str), categories=[s.library_id for s in sections])
    table.uns[SPATIAL_KEY] = {s.library_id: {"scalefactors": _scalefactors(s), "metadata": dict(s.metadata)} for s in sections}
    table = TableModel.parse(table, region=[s.library_id for s in sections], region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(images=images, shapes=shapes, tables={TABLE_KEY: table})
