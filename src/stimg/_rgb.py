"""One conversion of any image layout/dtype to the ``(3, y, x)`` uint8 RGB that every stimg step reads.

Accepted: RGB, RGBA (composited over white glass), grayscale (2-D or one channel; replicated, with
a warning); uint8, float in [0, 1] or [0, 255], and 16-bit integers (full 16-bit range, or 8-bit
values stored in 16 bits). Anything else is refused with an error naming the fix. Dask arrays stay
lazy (converted block by block); numpy arrays are converted in row blocks (no full float copy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._logging import logger
from ._utils import warn

_SAMPLE = 1024  # side of the central window whose values decide the scale
_ROWS = 512  # rows per block of an in-memory conversion


def _is_dask(arr: Any) -> bool:
    return type(arr).__module__.startswith("dask")


def _central_sample(arr: Any) -> np.ndarray:
    _, h, w = arr.shape
    y0, x0 = max(0, h // 2 - _SAMPLE // 2), max(0, w // 2 - _SAMPLE // 2)
    win = arr[:, y0:y0 + _SAMPLE, x0:x0 + _SAMPLE]
    return np.asarray(win.compute() if _is_dask(win) else win)


def _scale(arr: Any, where: str) -> float:
    """Factor mapping the image's colour values to [0, 255]."""
    dt = np.dtype(arr.dtype)
    if dt == np.uint8:
        return 1.0
    if dt == np.bool_ or not np.issubdtype(dt, np.number) or np.issubdtype(dt, np.complexfloating):
        msg = f"{where} has dtype {dt}; pass an RGB image as uint8 (0–255) or float (0–1)."
        raise TypeError(msg)
    sample = _central_sample(arr).astype(np.float64)
    if not np.isfinite(sample).all():
        msg = f"{where} has NaN/inf pixel values; replace them (e.g. np.nan_to_num(img, nan=1.0)) or pass a uint8 image."
        raise ValueError(msg)
    lo, hi = float(sample.min()), float(sample.max())
    if lo < 0:
        msg = f"{where} has negative pixel values (min {lo:g}); pass an RGB image as uint8 (0–255) or float (0–1)."
        raise ValueError(msg)
    if np.issubdtype(dt, np.floating):
        if hi <= 1.0:
            return 255.0
        if hi <= 255.0:
            return 1.0
        msg = (f"{where} is a float image with values up to {hi:g}; rescale it to [0, 1] (or convert to uint8) "
               "before passing it to stimg.")
        raise ValueError(msg)
    if hi <= 255:
        return 1.0
    if hi <= 65535:
        return 255.0 / 65535.0
    msg = f"{where} has {dt} values up to {hi:g}; convert it to 8-bit RGB (uint8) first."
    raise ValueError(msg)


def _convert_block(block: np.ndarray, factor: float, n_channels: int) -> np.ndarray:
    if n_channels == 3 and factor == 1.0 and block.dtype == np.uint8:
        return block
    x = block.astype(np.float32) * np.float32(factor)
    if n_channels == 4:  # composite over white glass
        a = np.clip(x[3:4] / 255.0, 0.0, 1.0)
        x = x[:3] * a + 255.0 * (1.0 - a)
    elif n_channels == 1:
        x = np.broadcast_to(x, (3, *x.shape[1:]))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_rgb8(arr: Any, *, where: str = "the image", channel_axis: int | None = 0) -> Any:
    """``(3, y, x)`` uint8 RGB of ``arr`` (numpy or dask; lazy stays lazy).

    Parameters
    ----------
    arr
        ``(c, y, x)`` (``channel_axis=0``), ``(y, x, c)`` (``channel_axis=-1``) or ``(y, x)`` grayscale.
    where
        Name of the image in error messages.
    channel_axis
        Position of the channel axis of a 3-D ``arr``.
    """
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if channel_axis not in (0, None):
            arr = arr.transpose(2, 0, 1) if _is_dask(arr) else np.moveaxis(arr, channel_axis, 0)
    else:
        msg = f"{where} has shape {tuple(arr.shape)}; pass a 2-D grayscale or 3-D RGB/RGBA image."
        raise ValueError(msg)
    c = int(arr.shape[0])
    if c not in (1, 3, 4):
        msg = (f"{where} has {c} channels (shape {tuple(arr.shape)}, channels first); stimg needs an RGB H&E image "
               "(3 channels), RGBA (4) or grayscale (1): select the RGB channels first.")
        raise ValueError(msg)
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        msg = f"{where} is empty (shape {tuple(arr.shape)})."
        raise ValueError(msg)
    factor = _scale(arr, where)
    if c == 3 and factor == 1.0 and arr.dtype == np.uint8:
        return arr
    if c == 1:
        warn(f"{where} is grayscale; it is replicated to RGB, but H&E encoders and stain steps expect colour.")
    logger.debug("%s: %s %d-channel image converted to RGB uint8%s", where, arr.dtype, c,
                " (alpha composited over white)" if c == 4 else "")
    if _is_dask(arr):
        arr = arr.rechunk({0: -1})
        return arr.map_blocks(_convert_block, factor, c, dtype=np.uint8, chunks=((3,), *arr.chunks[1:]))
    out = np.empty((3, *arr.shape[1:]), np.uint8)
    for y in range(0, arr.shape[1], _ROWS):
        out[:, y:y + _ROWS] = _convert_block(np.asarray(arr[:, y:y + _ROWS]), factor, c)
    return out
