"""Tissue detection (Otsu on saturation) and per-spot tissue coverage."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY, TISSUE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._spatial import Section, get_table, sections
from .._utils import warn
from .._validate import check_fraction
from ._patches import check_spots_on_image

_DARK = 30  # max-channel value below which a pixel is background (dark-field scans such as HER2ST A1)


def _downsampled(section: Section, working_mpp: float) -> tuple[np.ndarray, int]:
    """``(y, x, 3)`` uint8 view of the section image at about ``working_mpp`` µm/px (strided)."""
    step = max(1, int(round(working_mpp / section.mpp)))
    arr = section.image_array()[:, ::step, ::step]
    return np.moveaxis(np.asarray(arr), 0, -1), step


def mask_from_rgb(rgb: np.ndarray, *, smooth_px: float = 2.0, hole_px: int = 2500) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB image: Otsu threshold on (smoothed) HSV saturation.

    Dark pixels (background of dark-field scans) count as saturation 0. The saturation is
    smoothed with a Gaussian of ``smooth_px`` pixels before thresholding, and holes smaller
    than ``hole_px`` pixels inside the tissue are filled. Returns the boolean mask and the
    saturation threshold (0–1).
    """
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes

    x = rgb.astype(np.float32)
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx >= _DARK, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)
    if smooth_px > 0:
        sat = gaussian_filter(sat, smooth_px)
    if sat.size < 16 or np.ptp(sat) == 0:
        return np.zeros(sat.shape, bool), float("nan")
    thr = float(threshold_otsu(sat))
    mask = sat > thr
    if hole_px > 0:
        mask = remove_small_holes(mask, max_size=hole_px)
    return mask, thr


@d.dedent
def tissue_mask(
    data: Any,
    *,
    library_id: str | None = None,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    image_key: str | dict | None = None,
    working_mpp: float = 4.0,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of one section image, at about ``working_mpp`` µm per pixel.

    Parameters
    ----------
    %(data)s
    library_id
        Section; ``None`` requires a single section.
    %(table_key)s
    %(library_key)s
    %(image_key)s
    working_mpp
        Resolution of the mask in µm/px.

    Returns
    -------
    ``(mask, step)``: the ``(y, x)`` mask and the stride (mask pixel = ``step`` image pixels).

    Examples
    --------
    >>> import stimg as si
    >>> mask, step = si.pp.tissue_mask(si.datasets.synthetic(16, 5))
    >>> mask.dtype
    dtype('bool')
    """
    secs = sections(data, table_key=table_key, library_id=library_id, library_key=library_key, image_key=image_key)
    if len(secs) != 1:
        msg = f"tissue_mask works on one section; pass library_id= (one of {[s.library_id for s in secs]})."
        raise ValueError(msg)
    rgb, step = _downsampled(secs[0], working_mpp)
    return mask_from_rgb(rgb)[0], step


def _coverage(mask: np.ndarray, xy: np.ndarray, radius: float, square: bool) -> np.ndarray:
    """Fraction of mask pixels inside a disc (or square of side 2·radius) around each centre (vectorised)."""
    r = max(radius, 0.5)
    ri = int(np.ceil(r))
    dy, dx = np.mgrid[-ri:ri + 1, -ri:ri + 1]
    keep = np.ones_like(dx, bool) if square else (dx**2 + dy**2) <= r**2
    dx, dy = dx[keep], dy[keep]
    cx, cy = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
    out = np.zeros(len(xy))
    h, w = mask.shape
    for start in range(0, len(xy), 4096):  # bounded memory: 4096 spots × offsets at a time
        X = cx[start:start + 4096, None] + dx[None]
        Y = cy[start:start + 4096, None] + dy[None]
        inside = (X >= 0) & (X < w) & (Y >= 0) & (Y < h)
        vals = mask[np.clip(Y, 0, h - 1), np.clip(X, 0, w - 1)] & inside
        out[start:start + 4096] = vals.sum(1) / keep.sum()
    return out


@d.dedent
def tissue_coverage(
    data: Any,
    *,
    size_um: float | None = None,
    min_coverage: float | None = None,
    table_key: str = TABLE_KEY,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    image_key: str | dict | None = None,
    working_mpp: float = 4.0,
    key_added: str = TISSUE_KEY,
    inplace: bool = True,
) -> pd.Series | None:
    """Fraction of tissue under each spot: Otsu threshold on saturation, per section.

    The image is read at about ``working_mpp`` µm/px; saturation is thresholded with Otsu
    (dark background pixels, as in dark-field scans, count as background). STImage keeps
    patches with ≥ 70 %% tissue: use ``min_coverage=0.7`` (with ``size_um`` = the patch size).

    Parameters
    ----------
    %(data)s
    size_um
        Measure within a square of this side (µm) instead of the spot disc.
    min_coverage
        If given, remove spots below this fraction from the table (in place).
    %(table_key)s
    %(library_id)s
    %(library_key)s
    %(image_key)s
    working_mpp
        Resolution of the tissue mask (µm/px).
    %(key_added)s
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` a :class:`~pandas.Series` of coverage per spot. Otherwise writes
    ``.obs[key_added]`` (NaN for spots of sections not processed) and
    ``.uns[key_added]['params']`` (with each section's Otsu threshold); with ``min_coverage``
    the table is subset to the passing spots.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(16, 5, as_anndata=True)
    >>> si.pp.tissue_coverage(adata)
    >>> float(adata.obs["tissue_coverage"].min()) > 0.5
    True
    """
    start = time.perf_counter()
    if size_um is not None and not (np.isfinite(size_um) and size_um > 0):
        msg = f"size_um must be a positive size in µm, got {size_um!r}."
        raise ValueError(msg)
    if min_coverage is not None:
        check_fraction(min_coverage, "min_coverage")
    table = get_table(data, table_key)
    secs = sections(data, table_key=table_key, library_id=library_id, library_key=library_key, image_key=image_key)
    check_spots_on_image(secs)
    cov = np.full(table.n_obs, np.nan)
    thresholds = {}
    for s in secs:
        rgb, step = _downsampled(s, working_mpp)
        mask, thr = mask_from_rgb(rgb)
        thresholds[s.library_id] = thr
        if not mask.any():
            warn(f"No tissue detected in the image of section {s.library_id!r}: its spots get coverage 0. "
                 "Check the image (blank, or not an H&E?).")
        radius = (size_um / s.mpp / 2.0) if size_um is not None else s.spot_diameter_px / 2.0
        cov[s.obs_index] = _coverage(mask, s.xy / step, radius / step, square=size_um is not None)
    result = pd.Series(cov, index=table.obs_names, name=key_added)
    if not inplace:
        return result
    if min_coverage is not None:
        keep = ~(result.to_numpy() < min_coverage)
        if not keep.any():
            msg = f"No spot has tissue coverage ≥ {min_coverage}; lower min_coverage."
            raise ValueError(msg)
    table.obs[key_added] = result.to_numpy()
    table.uns[key_added] = {"params": {"size_um": size_um, "min_coverage": min_coverage, "working_mpp": working_mpp,
                                       "otsu_saturation_threshold": thresholds, "image_key": str(image_key)}}
    log_added("obs", key_added, start)
    if min_coverage is not None and not keep.all():
        logger.info("removed %d of %d spots with tissue coverage < %g", int((~keep).sum()), len(keep), min_coverage)
        table._inplace_subset_obs(keep)
    return None
