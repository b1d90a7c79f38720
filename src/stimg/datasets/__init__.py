"""Data sets: real HER2ST sections, the breast single-cell reference, synthetic data."""

from ._her2st import SECTIONS as _SECTIONS
from ._her2st import SECTIONS_WITH_IMAGE as _SECTIONS_WITH_IMAGE
from ._her2st import available_sections, her2st, her2st_sc_reference
from ._synthetic import synthetic

#: The 36 sections of the public HER2ST data set (patients A–H), e.g. ``"C2"``.
HER2ST_SECTIONS: tuple[str, ...] = _SECTIONS
#: HER2ST sections whose H&E image is public (C2–C6 full resolution, A1 low resolution, B4).
HER2ST_SECTIONS_WITH_IMAGE: tuple[str, ...] = _SECTIONS_WITH_IMAGE

__all__ = [
    "HER2ST_SECTIONS",
    "HER2ST_SECTIONS_WITH_IMAGE",
    "available_sections",
    "her2st",
    "her2st_sc_reference",
    "synthetic",
]
