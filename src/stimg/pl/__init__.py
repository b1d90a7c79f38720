"""Plotting: spatial maps over the H&E, patch galleries, curves."""

from ._recall import recall
from ._sampling import sampling_curve
from ._spatial import patches, spatial
from ._uncertainty import uncertainty

__all__ = ["patches", "recall", "sampling_curve", "spatial", "uncertainty"]
