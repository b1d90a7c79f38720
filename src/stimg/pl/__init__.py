"""Plotting: spatial maps over the H&E, uncertainty maps, patch galleries, sampling curves."""

from ._sampling import sampling_curve
from ._spatial import patches, spatial
from ._uncertainty import uncertainty

__all__ = ["patches", "sampling_curve", "spatial", "uncertainty"]
