"""Readers and writers."""

from ._image import read_image
from ._legacy_st import estimate_mpp, read_legacy_st
from ._visium import read_visium
from ._visium_hd import read_visium_hd
from ._xenium import read_xenium

__all__ = ["estimate_mpp", "read_image", "read_legacy_st", "read_visium", "read_visium_hd", "read_xenium"]
