"""Pseudo-spots: aggregate cells (Xenium) or bins (Visium HD) into spots of a chosen physical size."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import INSTANCE_KEY, LIBRARY_KEY, REGION_KEY, SPATIAL_KEY, TABLE_KEY
from .._docs import d
from .._logging import log_added
from .._spatial import get_table, is_spatialdata, library_column, native_units
from .._validate import assert_key_in

_SQRT3 = float(np.sqrt(3.0))


def _square_cells(xy_um: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell of each point (integer pairs) and the cell centres in µm, squares of side ``size``."""
    ij = np.floor(xy_um / size).astype(np.int64)
    return ij, (ij + 0.5) * size


def _hex_cells(xy_um: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of a triangular lattice of spacing ``size`` (a tiling by hexagons of width ``size``)."""
    h = size * _SQRT3 / 2.0  # row spacing
    r0 = np.floor(xy_um[:, 1] / h).astype(np.int64)
    best_d = np.full(len(xy_um), np.inf)
    best = np.zeros((len(xy_um), 2), np.int64)
    for dr in (0, 1):
        r = r0 + dr
        off = (r % 2) * 0.5 * size
        c = np.rint((xy_um[:, 0] - off) / size).astype(np.int64)
        for dc in (-1, 0, 1):
            cc = c + dc
            cx, cy = cc * size + off, r * h
            dist = (xy_um[:, 0] - cx) ** 2 + (xy_um[:, 1] - cy) ** 2
            better = dist < best_d
            best_d[better] = dist[better]
            best[better] = np.c_[cc[better], r[better]]
    centres = np.c_[best[:, 0] * size + (best[:, 1] % 2) * 0.5 * size, best[:, 1] * h]
    return best, centres


_GRIDS = {"square": _square_cells, "hex": _hex_cells}


@d.dedent
def pseudo_spots(
    data: Any,
    size_um: float = 100.0,
    *,
    shape: str = "square",
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    labels_key: str | None = None,
    layer: str | None = None,
    min_units: int = 1,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> AnnData | None:
    """Aggregate cells or bins into pseudo-spots of a physical size, so the spot pipeline runs on them.

    Each unit (a Xenium cell, a Visium HD bin, any spot) goes to the grid cell that contains its
    centre, per section (never across sections): squares of side ``size_um``, or hexagons of width
    ``size_um`` (cells of a triangular lattice of spacing ``size_um``; the tiling has no gaps,
    unlike Visium's 55 µm spots at 100 µm pitch). Counts are summed; with ``labels_key`` the
    fraction of each label (e.g. cell type) per pseudo-spot is kept. A pseudo-spot's centre is the
    mean position of its units (the cell's centre when the cell is full). Linear in units.

    Parameters
    ----------
    %(data)s
    size_um
        Side (square) or width (hexagon) of a pseudo-spot in µm, e.g. 55 or 100 to mimic Visium/ST.
    shape
        ``'square'`` or ``'hex'``.
    %(table_key)s
    %(library_key)s
    labels_key
        Categorical ``.obs`` column of the units (e.g. a cell type) whose fractions are kept in the
        pseudo-spots' ``.obsm['<labels_key>_fractions']``.
    layer
        Layer of counts to sum; ``None`` uses ``X``.
    min_units
        Drop pseudo-spots with fewer units.
    key_added
        Name of the new table (and, for SpatialData, prefix of the new shapes
        ``'{section}_{key_added}'``); ``None``: ``'pseudo_{shape}_{size}um'``.
    overwrite
        Replace an existing table/shapes/column of that name.
    %(inplace)s

    Returns
    -------
    The pseudo-spot table when ``inplace=False`` or for AnnData input (AnnData is never
    modified except the link column below); ``None`` for SpatialData with ``inplace=True``.
    Written (``inplace=True``):

    - SpatialData: table ``key_added`` (summed counts; ``obs``: ``n_units``, section, region and
      instance keys; ``obsm['spatial']``; ``uns['spatial']`` with ``spot_diameter_um = size_um``)
      linked to new circles ``'{section}_{key_added}'`` in the units' coordinate systems, so
      :func:`stimg.pp.embed`, :func:`stimg.tl.predict_expression` and sampling run on it;
    - the unit table's ``.obs[key_added]``: the pseudo-spot each unit belongs to (NaN if dropped),
      the link back to members.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.io.read_xenium("xenium_outs/")  # doctest: +SKIP
    >>> si.pp.pseudo_spots(sdata, 100, shape="hex")  # doctest: +SKIP
    >>> si.pp.embed(sdata, table_key="pseudo_hex_100um")  # doctest: +SKIP
    """
    start = time.perf_counter()
    if shape not in _GRIDS:
        msg = f"shape must be one of {sorted(_GRIDS)}, got {shape!r}."
        raise ValueError(msg)
    size = float(size_um)
    if not np.isfinite(size) or size <= 0:
        msg = f"size_um must be a positive number of µm, got {size_um!r}."
        raise ValueError(msg)
    if int(min_units) < 1:
        msg = f"min_units must be ≥ 1, got {min_units!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    if table.n_obs == 0:
        msg = "The table has no units to aggregate (n_obs == 0); check the filtering that produced it."
        raise ValueError(msg)
    key_added = key_added or f"pseudo_{shape}_{size:g}um"
    X = table.X if layer is None else table.layers[layer] if layer in table.layers else None
    if X is None:
        assert_key_in(table.layers, layer, where="table.layers")
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    if X.nnz and (not np.isfinite(X.data).all() or X.data.min() < 0):
        msg = "counts must be finite and non-negative to be summed into pseudo-spots; pass the raw-count layer."
        raise ValueError(msg)
    labels = None
    if labels_key is not None:
        assert_key_in(table.obs, labels_key, where="table.obs", hint="Pass a categorical column such as a cell type.")
        labels = table.obs[labels_key].astype("category")
    units = native_units(data, table, library_key)
    if not overwrite:
        clash = [f"table.obs[{key_added!r}]"] if key_added in table.obs else []
        if is_spatialdata(data) and inplace:
            clash += [f"sdata.tables[{key_added!r}]"] * (key_added in data.tables)
            clash += [f"sdata.shapes[{u.library_id}_{key_added}]" for u in units if f"{u.library_id}_{key_added}" in data.shapes]
        if clash:
            msg = f"{', '.join(clash)} already exist(s); pass overwrite=True or another key_added."
            raise ValueError(msg)

    rows, cols, names, libs, centres_native, n_units, regions = [], [], [], [], [], [], []
    member = np.full(table.n_obs, None, dtype=object)
    offset = 0
    for u in units:
        cells, centres_um = _GRIDS[shape](u.xy * u.um_per_unit, size)
        uniq, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        keep = counts >= int(min_units)
        new_id = np.cumsum(keep) - 1
        ok = keep[inverse]
        region = f"{u.library_id}_{key_added}"
        spot_names = np.array([f"{u.library_id}_{key_added}_{i}_{j}" for i, j in uniq[keep]], dtype=object)
        rows.append(offset + new_id[inverse[ok]])
        cols.append(u.obs_index[ok])
        member[u.obs_index[ok]] = spot_names[new_id[inverse[ok]]]
        names.append(spot_names)
        libs += [u.library_id] * int(keep.sum())
        regions += [region] * int(keep.sum())
        # centre: the mean position of the units (the grid cell's centre for a full interior cell; inside
        # the tissue — and the image — for cells cut by the tissue edge)
        sums = np.zeros((len(uniq), 2))
        np.add.at(sums, inverse, u.xy)
        centres_native.append(sums[keep] / counts[keep, None])
        n_units.append(counts[keep])
        offset += int(keep.sum())
    if offset == 0:
        msg = f"No pseudo-spot has ≥ {min_units} units; lower min_units or size_um."
        raise ValueError(msg)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    P = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(offset, table.n_obs))
    counts_sum = (P @ X).astype(np.float32)
    obs_names = pd.Index(np.concatenate(names).astype(str))
    lib_col = library_column(table, library_key)[0] or LIBRARY_KEY
    obs = pd.DataFrame({"n_units": np.concatenate(n_units).astype(np.int64)}, index=obs_names)
    obs[LIBRARY_KEY] = pd.Categorical(libs, categories=[u.library_id for u in units])
    out = AnnData(X=sp.csr_matrix(counts_sum), obs=obs, var=table.var[[]].copy())
    out.obsm[SPATIAL_KEY] = np.concatenate(centres_native)
    if labels is not None:
        codes = labels.cat.codes.to_numpy()
        has = codes >= 0  # units without a label count in n_units but in no fraction
        onehot = sp.csr_matrix((np.ones(int(has.sum()), np.float32), (np.flatnonzero(has), codes[has])),
                               shape=(table.n_obs, len(labels.cat.categories)))
        frac = np.asarray((P @ onehot).todense()) / out.obs["n_units"].to_numpy()[:, None]
        out.obsm[f"{labels_key}_fractions"] = pd.DataFrame(frac, index=obs_names,
                                                          columns=[str(c) for c in labels.cat.categories])
    params = {"size_um": size, "shape": shape, "table_key": table_key, "labels_key": labels_key, "layer": layer,
              "min_units": int(min_units), "source_library_key": lib_col}
    out.uns[key_added] = {"params": params}
    spatial = {}
    for u in units:
        src = dict(table.uns.get(SPATIAL_KEY, {}).get(u.library_id, {}))
        sf = dict(src.get("scalefactors", {}))
        sf.update({"spot_diameter_um": size, "pseudo_spot_shape": shape})
        if "microns_per_pixel" in sf:
            sf["spot_diameter_fullres"] = size / float(sf["microns_per_pixel"])
        meta = {**dict(src.get("metadata", {})), "unit_kind": "pseudo_spot", "source_section": u.library_id}
        key = f"{u.library_id}_{key_added}" if is_spatialdata(data) else u.library_id
        spatial[key] = {**{k: v for k, v in src.items() if k not in ("scalefactors", "metadata")},
                        "scalefactors": sf, "metadata": meta}
    out.uns[SPATIAL_KEY] = spatial

    if is_spatialdata(data):
        from spatialdata.models import ShapesModel, TableModel

        out.obs[REGION_KEY] = pd.Categorical(regions, categories=[f"{u.library_id}_{key_added}" for u in units])
        out.obs[INSTANCE_KEY] = np.concatenate([np.arange(len(n)) for n in names])
        new_shapes = {}
        for u, nm, c in zip(units, names, centres_native, strict=True):
            r = size / 2.0 / u.um_per_unit
            new_shapes[f"{u.library_id}_{key_added}"] = ShapesModel.parse(
                c, geometry=0, radius=np.full(len(nm), r), index=pd.RangeIndex(len(nm)),
                transformations=dict(u.transformations))
        out = TableModel.parse(out, region=list(new_shapes), region_key=REGION_KEY, instance_key=INSTANCE_KEY)
        if not inplace:
            return out
        for k, v in new_shapes.items():
            data.shapes[k] = v
        data.tables[key_added] = out
        table.obs[key_added] = pd.Categorical(member)
        log_added("tables", key_added, start)
        log_added("obs", key_added)
        return None
    if inplace:
        table.obs[key_added] = pd.Categorical(member)
        log_added("obs", key_added, start)
    return out
