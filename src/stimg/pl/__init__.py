"""Plotting: spatial maps over the H&E, patch galleries, curves."""

from ._explain import explain
from ._sampling import sampling_curve
from ._spatial import patches, spatial
from ._uncertainty import uncertainty

__all__ = ["explain", "patches", "sampling_curve", "spatial", "uncertainty"]
