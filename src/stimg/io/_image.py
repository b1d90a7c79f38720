"""Reading H&E images into (y, x, 3) uint8 arrays."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._rgb import to_rgb8


@contextmanager
def _allow_large_images():
    """Raise Pillow's decompression-bomb limit for one read only (92-megapixel scans)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def read_image(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Return ``image`` (a path or an array) as a ``(y, x, 3)`` uint8 RGB array.

    Large scans (e.g. 92-megapixel JPEGs) are allowed for this read only; grey images are
    expanded to RGB, RGBA is composited over white, float images in [0, 1] and 16-bit images are
    rescaled; other layouts and dtypes are refused with an error naming the fix.

    Parameters
    ----------
    image
        Path to a JPEG/PNG/TIFF file, or an array ``(y, x)``, ``(y, x, 3)`` or ``(y, x, 4)``.

    Returns
    -------
    The image as a C-contiguous ``(y, x, 3)`` uint8 array.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The file cannot be decoded as an image, or the array is not ``(y, x, 3|4)``.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> si.io.read_image(np.ones((4, 5, 3), np.float32)).shape  # float in [0, 1] → uint8
    (4, 5, 3)
    """
    if isinstance(image, np.ndarray):
        arr = image
    else:
        path = Path(image)
        if not path.exists():
            msg = f"Image file {str(path)!r} does not exist; check the path."
            raise FileNotFoundError(msg)
        from PIL import Image, UnidentifiedImageError

        try:
            with _allow_large_images(), Image.open(path) as im:
                arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # no extra copy when RGB
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            msg = f"Could not read image {str(path)!r} ({e}). Pass a JPEG/PNG/TIFF file or an RGB array."
            raise ValueError(msg) from e
    if arr.ndim != 2 and (arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4)):
        msg = f"Image must have shape (y, x, 3) (RGB), (y, x, 4) (RGBA) or (y, x) (grey), got {arr.shape}."
        raise ValueError(msg)
    where = "the image array" if isinstance(image, np.ndarray) else f"image {str(image)!r}"
    arr = np.moveaxis(to_rgb8(arr, where=where, channel_axis=-1), 0, -1)
    return np.ascontiguousarray(arr)


def downsample(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Area-downsample a ``(y, x, 3)`` image so its long side is at most ``max_side``."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return img, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    with _allow_large_images():
        small = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))
    return small, size[0] / w
