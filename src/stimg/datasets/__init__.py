"""Data sets: real HER2ST sections, the breast single-cell reference, synthetic data."""

from ._her2st import SECTIONS as HER2ST_SECTIONS
from ._her2st import SECTIONS_WITH_IMAGE as HER2ST_SECTIONS_WITH_IMAGE
from ._her2st import available_sections, her2st, her2st_sc_reference
from ._synthetic import synthetic

__all__ = [
    "HER2ST_SECTIONS",
    "HER2ST_SECTIONS_WITH_IMAGE",
    "available_sections",
    "her2st",
    "her2st_sc_reference",
    "synthetic",
]
