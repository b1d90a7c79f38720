"""One view over SpatialData and AnnData: per section, spot centres in image pixels, the image, µm/px.

Everything that touches images (tissue QC, patches, stain, plots) goes through :func:`sections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ._constants import LIBRARY_KEY, SPATIAL_KEY, TABLE_KEY, VISIUM_SPOT_DIAMETER_UM
from ._rgb import to_rgb8
from ._utils import warn
from ._validate import assert_key_in


def is_spatialdata(data: Any) -> bool:
    """Whether ``data`` is a :class:`~spatialdata.SpatialData` (without importing spatialdata eagerly)."""
    return type(data).__name__ == "SpatialData" and hasattr(data, "tables")


def get_table(data: Any, table_key: str = TABLE_KEY) -> AnnData:
    """The AnnData table of ``data`` (the object itself for AnnData); warns about duplicated spot names."""
    if isinstance(data, AnnData):
        table = data
    elif is_spatialdata(data):
        assert_key_in(data.tables, table_key, where="sdata.tables")
        table = data.tables[table_key]
    else:
        msg = f"Expected AnnData or SpatialData, got {type(data).__name__}."
        raise TypeError(msg)
    if not table.obs_names.is_unique:
        dup = table.obs_names[table.obs_names.duplicated()].unique()
        warn(f"{len(dup)} spot names (obs_names) occur more than once (e.g. {list(dup[:3])}); stimg matches spots by "
             "position, but anything joined by barcode (Loupe CSVs, merges) would be ambiguous. Make them unique "
             "first: adata.obs_names_make_unique() (or concatenate sections with index_unique='-').")
    return table


def library_column(table: AnnData, library_key: str | None = None) -> tuple[str | None, pd.Series]:
    """The obs column naming each spot's section, and its values as strings."""
    if library_key is None:
        attrs = table.uns.get("spatialdata_attrs", {})
        for cand in (attrs.get("region_key"), LIBRARY_KEY):
            if cand is not None and cand in table.obs:
                library_key = cand
                break
    if library_key is None:
        libs = list(table.uns.get(SPATIAL_KEY, {}).keys())
        lid = libs[0] if len(libs) == 1 else "section"
        return None, pd.Series(lid, index=table.obs_names)
    assert_key_in(table.obs, library_key, where="table.obs", hint="Pass library_key= naming the section column.")
    return library_key, table.obs[library_key].astype(str)


@dataclass
class Section:
    """Spots of one section in the pixel frame of its image."""

    library_id: str
    obs_index: np.ndarray  # integer positions in the table
    xy: np.ndarray  # (n, 2) x, y in pixels of ``image``
    image: Any | None  # (c, y, x) array-like (numpy, dask or xarray), lazy when possible
    image_key: str | None
    mpp: float | None  # µm per pixel of ``image``
    spot_diameter_px: float

    @property
    def n_obs(self) -> int:
        return len(self.obs_index)

    def image_array(self):
        """The raw ``(c, y, x)`` array (numpy or dask) without xarray wrapping."""
        img = self.image
        return img.data if hasattr(img, "dims") else img  # xarray → its numpy/dask array


def _check_xy(table: AnnData, idx: np.ndarray, xy: np.ndarray, lib: str) -> None:
    """Refuse spots without finite coordinates (NaN/inf), naming them and the fix."""
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        names = list(table.obs_names[idx[bad]][:3])
        msg = (f"{int(bad.sum())} of {len(xy)} spots of section {lib!r} have non-finite (NaN/inf) coordinates "
               f"(e.g. {names}); drop them first, e.g. adata = adata[np.isfinite(adata.obsm['spatial']).all(1)].copy().")
        raise ValueError(msg)


def _scalefactors(table: AnnData, lib: str) -> dict:
    return dict(table.uns.get(SPATIAL_KEY, {}).get(lib, {}).get("scalefactors", {}))


def _select_libraries(all_libs: Sequence[str], library_id: str | Sequence[str] | None) -> list[str]:
    if library_id is None:
        return list(all_libs)
    want = [library_id] if isinstance(library_id, str) else list(library_id)
    if not want:
        msg = "library_id is an empty list; pass at least one section."
        raise ValueError(msg)
    for w in want:
        assert_key_in(list(all_libs), w, where="the table's sections")
    return want


def _anndata_sections(table, libs, lib_values, image_key, spot_diameter_um, need_image):
    out = []
    if SPATIAL_KEY not in table.obsm:
        msg = "AnnData lacks obsm['spatial'] (spot centres in full-resolution pixels); read it with si.io or si.datasets."
        raise KeyError(msg)
    xy_all = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    for lib in libs:
        idx = np.flatnonzero(lib_values.to_numpy() == lib)
        sf = _scalefactors(table, lib)
        images = table.uns.get(SPATIAL_KEY, {}).get(lib, {}).get("images", {})
        key = image_key
        if key is None:
            key = next((k for k in ("fullres", "hires", "lowres") if k in images), None)
        elif key not in images:
            assert_key_in(images, key, where=f"adata.uns['spatial'][{lib!r}]['images']")
        if key is None and need_image:
            msg = (f"Section {lib!r} has no image in adata.uns['spatial'][{lib!r}]['images']; "
                   "read the data with an image, or use the SpatialData form for full-resolution patches.")
            raise KeyError(msg)
        scalef = 1.0 if key in (None, "fullres") else float(sf.get(f"tissue_{key}_scalef", 1.0))
        d_full = sf.get("spot_diameter_fullres")
        d_um = float(sf.get("spot_diameter_um", spot_diameter_um or VISIUM_SPOT_DIAMETER_UM))
        if "microns_per_pixel" in sf:
            mpp_full = float(sf["microns_per_pixel"])
        elif d_full:
            mpp_full = d_um / float(d_full)
        else:
            mpp_full = None
        if d_full is None:
            d_full = d_um / mpp_full if mpp_full else 1.0
        img = None
        if key is not None:
            img = to_rgb8(np.asarray(images[key]), where=f"adata.uns['spatial'][{lib!r}]['images'][{key!r}]",
                          channel_axis=-1)
        _check_xy(table, idx, xy_all[idx], lib)
        out.append(Section(lib, idx, xy_all[idx] * scalef, img, key,
                           None if mpp_full is None else mpp_full / scalef, float(d_full) * scalef))
    return out


def _pick_image(sdata, region: str, image_key):
    from spatialdata.transformations import get_transformation

    if isinstance(image_key, dict):
        image_key = image_key.get(region)
    if image_key is not None:
        assert_key_in(sdata.images, image_key, where="sdata.images")
        return image_key
    shp_cs = set(get_transformation(sdata.shapes[region], get_all=True))
    cands = []
    for name, img in sdata.images.items():
        if not shp_cs & set(get_transformation(img, get_all=True)):
            continue
        arr = _scale0(img)
        # prefer the section's own image, then the largest, then the plainest name (not derived ones)
        cands.append((name.startswith(region), arr.shape[-1] * arr.shape[-2], -len(name), name))
    if not cands:
        return None
    return max(cands)[-1]


def _scale0(img):
    from spatialdata import get_pyramid_levels
    from xarray import DataTree

    return get_pyramid_levels(img, n=0) if isinstance(img, DataTree) else img  # DataArray, or level 0


def _spatialdata_sections(sdata, table, libs, lib_key, lib_values, image_key, spot_diameter_um, need_image):
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    _, region_key, instance_key = get_table_keys(table)
    if lib_key != region_key:
        msg = f"For SpatialData the library key must be the table's region key {region_key!r}, got {lib_key!r}."
        raise ValueError(msg)
    out = []
    axes = ("x", "y")
    for lib in libs:
        assert_key_in(sdata.shapes, lib, where="sdata.shapes", hint="The table's regions must be shape elements.")
        shapes = sdata.shapes[lib]
        idx = np.flatnonzero(lib_values.to_numpy() == lib)
        inst = table.obs[instance_key].to_numpy()[idx]
        missing = pd.Index(inst).difference(shapes.index)
        if len(missing):
            msg = f"{len(missing)} spots of {lib!r} have instance ids ({list(missing[:3])}…) not in sdata.shapes[{lib!r}]."
            raise KeyError(msg)
        circ = shapes.loc[inst]
        key = _pick_image(sdata, lib, image_key)
        if key is None and need_image:
            msg = (f"No image shares a coordinate system with the spots of {lib!r}. Available images: "
                   f"{list(sdata.images)}; pass image_key=.")
            raise KeyError(msg)
        shp_t = get_transformation(shapes, get_all=True)
        if key is not None:
            img = _scale0(sdata.images[key])
            img_t = get_transformation(sdata.images[key], get_all=True)
            cs = next(c for c in shp_t if c in img_t)
            A = img_t[cs].inverse().to_affine_matrix(axes, axes) @ shp_t[cs].to_affine_matrix(axes, axes)
            if img.dtype != np.uint8 or img.sizes.get("c", 3) != 3:
                img = to_rgb8(img.data, where=f"sdata.images[{key!r}]")
        else:
            img, A = None, np.eye(3)
        pts = np.c_[circ.geometry.x.to_numpy(), circ.geometry.y.to_numpy(), np.ones(len(circ))] @ A.T
        _check_xy(table, idx, pts[:, :2], lib)
        scale = float(np.sqrt(abs(np.linalg.det(A[:2, :2]))))
        radius = float(np.median(circ["radius"])) * scale if "radius" in circ else 1.0
        sf = _scalefactors(table, lib)
        d_um = float(sf.get("spot_diameter_um", spot_diameter_um or VISIUM_SPOT_DIAMETER_UM))
        out.append(Section(lib, idx, pts[:, :2], img, key, d_um / (2 * radius), 2 * radius))
    return out


def sections(
    data: Any,
    *,
    table_key: str = TABLE_KEY,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    image_key: str | dict | None = None,
    spot_diameter_um: float | None = None,
    need_image: bool = True,
) -> list[Section]:
    """Resolve ``data`` into :class:`Section` views (no pixel data is read)."""
    table = get_table(data, table_key)
    if table.n_obs == 0:
        msg = "The table has no spots (n_obs == 0); check the filtering that produced it."
        raise ValueError(msg)
    lib_key, lib_values = library_column(table, library_key)
    present = list(pd.unique(lib_values))
    libs = _select_libraries(present, library_id)
    if is_spatialdata(data):
        return _spatialdata_sections(data, table, libs, lib_key, lib_values, image_key, spot_diameter_um, need_image)
    return _anndata_sections(table, libs, lib_values, image_key, spot_diameter_um, need_image)


@dataclass
class NativeUnits:
    library_id: str
    obs_index: np.ndarray  # rows of the unit table
    xy: np.ndarray  # (n, 2) in the native frame (shapes coordinates / obsm['spatial'] pixels)
    um_per_unit: float  # µm per native coordinate unit
    transformations: dict | None  # of the source shapes (SpatialData)


def native_units(data: Any, table: AnnData, library_key: str | None = None) -> list[NativeUnits]:
    """Each section's unit centres in their own frame, with µm per coordinate unit.

    The frame is the shapes' coordinates (SpatialData) or ``obsm['spatial']`` pixels (AnnData);
    unlike :func:`sections`, no image is involved.
    """
    lib_key, libs = library_column(table, library_key)
    out = []
    for lib in pd.unique(libs):
        idx = np.flatnonzero(libs.to_numpy() == lib)
        sf = table.uns.get(SPATIAL_KEY, {}).get(lib, {}).get("scalefactors", {})
        if is_spatialdata(data):
            from spatialdata.models import get_table_keys
            from spatialdata.transformations import get_transformation

            _, _, inst_key = get_table_keys(table)
            assert_key_in(data.shapes, lib, where="sdata.shapes", hint="The table's regions must be shape elements.")
            shapes = data.shapes[lib]
            geo = shapes.loc[table.obs[inst_key].to_numpy()[idx]]
            if "radius" in geo:
                xy = np.c_[geo.geometry.x.to_numpy(), geo.geometry.y.to_numpy()]
                d_native = 2 * float(np.median(geo["radius"]))
            else:  # polygons: centroids, side from the area
                cen = geo.geometry.centroid
                xy = np.c_[cen.x.to_numpy(), cen.y.to_numpy()]
                d_native = float(np.median(np.sqrt(geo.geometry.area)))
            d_um = sf.get("spot_diameter_um")
            if d_um is None or d_native <= 0:
                msg = (f"Section {lib!r}: µm per coordinate unit unknown (table.uns['spatial'][{lib!r}]['scalefactors'] "
                       "lacks spot_diameter_um); read the data with si.io readers.")
                raise ValueError(msg)
            _check_xy(table, idx, xy, str(lib))
            out.append(NativeUnits(str(lib), idx, xy, float(d_um) / d_native, get_transformation(shapes, get_all=True)))
        else:
            assert_key_in(table.obsm, SPATIAL_KEY, where="adata.obsm", hint="Unit centres are needed (obsm['spatial']).")
            xy = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[idx, :2]
            if "microns_per_pixel" in sf:
                mpp = float(sf["microns_per_pixel"])
            elif sf.get("spot_diameter_fullres") and sf.get("spot_diameter_um"):
                mpp = float(sf["spot_diameter_um"]) / float(sf["spot_diameter_fullres"])
            else:
                msg = (f"Section {lib!r}: µm per pixel unknown; set adata.uns['spatial'][{lib!r}]['scalefactors']"
                       "['microns_per_pixel'].")
                raise ValueError(msg)
            _check_xy(table, idx, xy, str(lib))
            out.append(NativeUnits(str(lib), idx, xy, mpp, None))
    return out
