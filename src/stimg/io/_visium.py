"""Visium reader (wraps spatialdata-io)."""

from __future__ import annotations

import os
from pathlib import Path

from .._constants import SPATIAL_KEY, TABLE_KEY, VISIUM_SPOT_DIAMETER_UM


def read_visium(path: str | os.PathLike, *, dataset_id: str | None = None, counts_file: str | None = None,
                fullres_image_file: str | os.PathLike | None = None, **kwargs):
    """Read a Space Ranger output folder into SpatialData via :func:`spatialdata_io.visium`.

    Adds ``table.uns['spatial'][dataset_id]['scalefactors']`` with the spot diameter in µm (55) and
    µm/px of the full-resolution frame, so patches can be cut at a physical size.

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder (with ``spatial/`` and the count matrix).
    dataset_id
        Section name; ``None`` uses the folder name.
    counts_file
        Count matrix file name; ``None`` tries ``filtered_feature_bc_matrix.h5`` and the
        ``{dataset_id}_``-prefixed form.
    fullres_image_file
        Full-resolution H&E image, if available.
    **kwargs
        Passed to :func:`spatialdata_io.visium`.

    Returns
    -------
    :class:`~spatialdata.SpatialData` with images ``{id}_hires_image``/``{id}_lowres_image``
    (and ``{id}_full_image``), circles ``{id}`` and table ``'table'``.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.io.read_visium("outs/", dataset_id="V1")  # doctest: +SKIP
    """
    import json

    import spatialdata_io

    path = Path(path)
    if not path.is_dir():
        msg = f"Visium folder {str(path)!r} does not exist or is not a folder."
        raise FileNotFoundError(msg)
    dataset_id = dataset_id or path.name
    if counts_file is None:
        counts_file = next((c for c in ("filtered_feature_bc_matrix.h5", f"{dataset_id}_filtered_feature_bc_matrix.h5")
                            if (path / c).exists()), "filtered_feature_bc_matrix.h5")
    if fullres_image_file is not None:
        kwargs["fullres_image_file"] = fullres_image_file
    sdata = spatialdata_io.visium(path, dataset_id=dataset_id, counts_file=counts_file, **kwargs)
    table = sdata.tables[TABLE_KEY]
    sf_file = path / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_file.read_text()) if sf_file.exists() else {}
    sf["spot_diameter_um"] = VISIUM_SPOT_DIAMETER_UM
    if sf.get("spot_diameter_fullres"):
        sf["microns_per_pixel"] = VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"])
    table.uns.setdefault(SPATIAL_KEY, {})
    table.uns[SPATIAL_KEY][dataset_id] = {"scalefactors": sf, "metadata": {"technology": "visium"}}
    table.obs["library_id"] = table.obs[sdata.tables[TABLE_KEY].uns["spatialdata_attrs"]["region_key"]].astype("category")
    return sdata
