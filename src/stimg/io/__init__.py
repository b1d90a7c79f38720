"""Readers: legacy ST / HER2ST, Visium, Visium HD, Xenium, H&E images and whole-slide images."""

from ._image import read_image
from ._legacy_st import estimate_mpp, read_legacy_st
from ._loupe import LoupeFormatError, read_loupe, write_loupe
from ._visium import read_visium
from ._visium_hd import read_visium_hd
from ._wsi import read_wsi
from ._xenium import read_xenium

__all__ = [
    "LoupeFormatError",
    "estimate_mpp",
    "read_image",
    "read_legacy_st",
    "read_loupe",
    "read_visium",
    "read_visium_hd",
    "read_wsi",
    "read_xenium",
    "write_loupe",
]
