"""Reader for legacy Spatial Transcriptomics (ST) sections (e.g. HER2ST)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import SPATIAL_KEY, ST_SPOT_DIAMETER_UM, ST_SPOT_PITCH_UM
from .._logging import logger
from .._utils import warn
from ._convert import SectionData, to_anndata, to_spatialdata
from ._image import read_image

PathLike = str | os.PathLike
_DROP_WARN = 0.05  # warn when more than this fraction (and > 2) of count or spot rows has no partner


def _read_tsv(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` of a (possibly gzipped) TSV whose errors name the file and the fix."""
    import zlib

    try:
        return pd.read_csv(path, sep="\t", **kwargs)
    except (EOFError, OSError, zlib.error, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        size = path.stat().st_size
        msg = (f"Could not read the {what} file {str(path)!r} ({size} bytes): {type(e).__name__}: {e}. The file is "
               "truncated or corrupt; download it again (delete it to let stimg re-download a public data set).")
        raise ValueError(msg) from None


def _read_counts(counts: PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(counts, pd.DataFrame):
        df = counts
    else:
        path = Path(counts)
        if not path.exists():
            msg = f"Counts file {str(path)!r} does not exist."
            raise FileNotFoundError(msg)
        df = _read_tsv(path, "counts", index_col=0)
    if df.shape[0] == 0 or df.shape[1] == 0:
        msg = f"Counts table is empty (shape {df.shape}); expected spots × genes."
        raise ValueError(msg)
    vals = df.to_numpy()
    if not np.issubdtype(vals.dtype, np.number):
        msg = "Counts table must be numeric (spots × genes with spot ids as the first column)."
        raise TypeError(msg)
    if not np.isfinite(vals).all():
        msg = f"Counts table has {int((~np.isfinite(vals)).sum())} non-finite values."
        raise ValueError(msg)
    df.index = df.index.astype(str)
    return df


def _read_spots(spots: PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(spots, pd.DataFrame):
        df = spots.copy()
    else:
        path = Path(spots)
        if not path.exists():
            msg = f"Spot file {str(path)!r} does not exist."
            raise FileNotFoundError(msg)
        df = _read_tsv(path, "spot")
    need = {"x", "y", "pixel_x", "pixel_y"}
    if missing := need - set(df.columns):
        msg = f"Spot table lacks columns {sorted(missing)}; it has {list(df.columns)}. Expected the ST spot-detector format."
        raise KeyError(msg)
    if "selected" in df.columns:
        df = df[df["selected"].astype(int) == 1]
    df = df.assign(_id=df["x"].round().astype(int).astype(str) + "x" + df["y"].round().astype(int).astype(str))
    return df.drop_duplicates("_id").set_index("_id")


def estimate_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, pitch_um: float = ST_SPOT_PITCH_UM) -> float:
    """Estimate µm per pixel from the spot pitch: fit pixel ≈ a·array + b per axis.

    Parameters
    ----------
    array_xy
        ``(n, 2)`` array (grid) coordinates of the spots.
    pixel_xy
        ``(n, 2)`` pixel coordinates of the same spots.
    pitch_um
        Centre-to-centre distance of neighbouring grid positions (200 µm for legacy ST).

    Returns
    -------
    µm per pixel.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> grid = np.array([[1, 1], [2, 1], [3, 2]])
    >>> si.io.estimate_mpp(grid, grid * 290.0)
    0.6896551724137931
    """
    array_xy, pixel_xy = np.asarray(array_xy, float), np.asarray(pixel_xy, float)
    if array_xy.shape != pixel_xy.shape or array_xy.ndim != 2 or array_xy.shape[1] != 2:
        msg = f"array_xy and pixel_xy must both have shape (n, 2), got {array_xy.shape} and {pixel_xy.shape}."
        raise ValueError(msg)
    if not (np.isfinite(array_xy).all() and np.isfinite(pixel_xy).all()):
        msg = "array_xy/pixel_xy have non-finite (NaN/inf) coordinates; drop those spots or pass mpp=."
        raise ValueError(msg)
    steps = []
    for k in range(2):
        a = np.asarray(array_xy[:, k], float)
        if np.ptp(a) == 0:
            continue
        slope = np.polyfit(a, np.asarray(pixel_xy[:, k], float), 1)[0]
        steps.append(abs(slope))
    if not steps or not np.all(np.isfinite(steps)) or min(steps) < 1e-6:
        msg = "Cannot estimate µm/px from the spot grid (need spots on at least two grid rows or columns); pass mpp=."
        raise ValueError(msg)
    return float(pitch_um / np.mean(steps))


def _check_on_image(xy: np.ndarray, image: np.ndarray, library_id: str) -> None:
    h, w = image.shape[:2]
    off = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if off.any():
        msg = (
            f"{int(off.sum())} of {len(xy)} spot centres of {library_id!r} lie outside the {w}×{h} image "
            f"(e.g. x={xy[off][0, 0]:.0f}, y={xy[off][0, 1]:.0f}). The image and the spot coordinates disagree: "
            "pass the full-resolution image the coordinates refer to, or set image_scale to the image's "
            "size relative to it."
        )
        raise ValueError(msg)


def legacy_st_section(
    counts: PathLike | pd.DataFrame,
    spots: PathLike | pd.DataFrame,
    image: PathLike | np.ndarray | None = None,
    mpp: float | None = None,
    *,
    library_id: str = "section",
    image_scale: float = 1.0,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    pitch_um: float = ST_SPOT_PITCH_UM,
    metadata: dict | None = None,
) -> SectionData:
    """Read one legacy-ST section into a :class:`SectionData` (internal building block)."""
    import scipy.sparse as sp

    cnt = _read_counts(counts)
    spt = _read_spots(spots)
    common = cnt.index.intersection(spt.index)
    no_spot, no_counts = cnt.index.difference(spt.index), spt.index.difference(cnt.index)
    if len(common) and (len(no_spot) > max(2, _DROP_WARN * len(cnt)) or len(no_counts) > max(2, _DROP_WARN * len(spt))):
        warn(f"{library_id}: kept {len(common)} spots; dropped {len(no_spot)} of {len(cnt)} count rows without a "
             f"spot-file row and {len(no_counts)} of {len(spt)} (selected) spot rows without counts. Check that the "
             "counts and spot files belong to the same section (ids are '{x}x{y}' grid positions).")
    elif len(no_spot) or len(no_counts):
        logger.info(
            "%s: dropped %d count rows without a spot-file row and %d spot rows without counts",
            library_id, len(no_spot), len(no_counts),
        )
    if len(common) == 0:
        msg = (
            f"No spot ids are shared by the counts ({list(cnt.index[:3])}…) and the spot file "
            f"({list(spt.index[:3])}…) of {library_id!r}; ids must be '{{x}}x{{y}}' grid coordinates."
        )
        raise ValueError(msg)
    cnt, spt = cnt.loc[common], spt.loc[common]
    genes = pd.Index(cnt.columns.astype(str))
    adata = AnnData(
        X=sp.csr_matrix(cnt.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(
            {"array_x": spt["x"].round().astype(int).to_numpy(), "array_y": spt["y"].round().astype(int).to_numpy()},
            index=pd.Index([f"{library_id}_{i}" for i in common]),
        ),
        var=pd.DataFrame(index=genes),
    )
    adata.var_names_make_unique()
    xy = spt[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64) * float(image_scale)
    adata.obsm[SPATIAL_KEY] = xy
    img = None
    if image is not None:
        img = read_image(image)
        _check_on_image(xy, img, library_id)
    if mpp is None:
        grid = spt[["new_x", "new_y"]].to_numpy(float) if {"new_x", "new_y"} <= set(spt.columns) else spt[["x", "y"]].to_numpy(float)
        mpp = estimate_mpp(grid, xy, pitch_um)
        logger.debug("%s: estimated %.3f µm/px from the %g µm spot pitch", library_id, mpp, pitch_um)
    elif not np.isfinite(mpp) or mpp <= 0:
        msg = f"mpp must be a positive number of µm per pixel, got {mpp!r}."
        raise ValueError(msg)
    meta = {"technology": "legacy_st", **(metadata or {})}
    return SectionData(library_id, adata, img, float(mpp), float(spot_diameter_um), meta)


def read_legacy_st(
    counts: PathLike | pd.DataFrame,
    spots: PathLike | pd.DataFrame,
    image: PathLike | np.ndarray | None = None,
    mpp: float | None = None,
    *,
    library_id: str = "section",
    image_scale: float = 1.0,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    pitch_um: float = ST_SPOT_PITCH_UM,
    as_anndata: bool = False,
):
    """Read a legacy Spatial Transcriptomics section (counts, spot file, optional H&E).

    Parameters
    ----------
    counts
        Spots × genes counts table (TSV path or DataFrame) whose row ids are ``"{x}x{y}"`` grid positions.
    spots
        Spot-detector table with columns ``x, y, pixel_x, pixel_y`` (and optionally ``selected``,
        ``new_x, new_y``); ``pixel_*`` are spot centres in pixels of the full-size image.
    image
        H&E image (path or ``(y, x, 3)`` array). ``None`` reads counts only.
    mpp
        µm per pixel of ``image``. ``None`` estimates it from the spot pitch.
    library_id
        Name of the section.
    image_scale
        Size of ``image`` relative to the image the ``pixel_*`` columns refer to (e.g. ``2000/6954``
        for a downscaled copy).
    spot_diameter_um
        Physical spot diameter (100 µm for legacy ST).
    pitch_um
        Centre-to-centre spot distance used to estimate ``mpp`` (200 µm for legacy ST).
    as_anndata
        Return :class:`~anndata.AnnData` with scanpy's ``.uns['spatial']`` instead of SpatialData.

    Returns
    -------
    :class:`~spatialdata.SpatialData` with the image ``{library_id}_full_image``, spot circles
    ``{library_id}`` (radius in pixels) and table ``'table'`` (raw counts in ``X``, pixel centres
    in ``obsm['spatial']``), or the AnnData form.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.io.read_legacy_st("C2.tsv.gz", "C2_selection.tsv", "C2.jpg", library_id="C2")  # doctest: +SKIP
    """
    sec = legacy_st_section(
        counts, spots, image, mpp, library_id=library_id, image_scale=image_scale,
        spot_diameter_um=spot_diameter_um, pitch_um=pitch_um,
    )
    return to_anndata([sec]) if as_anndata else to_spatialdata([sec])
