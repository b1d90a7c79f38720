"""Plotting: spatial maps over the H&E, uncertainty maps, patch galleries, sampling curves."""

from ._annotation import annotation_curve, confusion
from ._explain import explain
from ._recall import recall
from ._sampling import sampling_curve
from ._spatial import patches, spatial
from ._uncertainty import uncertainty

__all__ = ["annotation_curve", "confusion", "explain", "patches", "recall", "sampling_curve", "spatial", "uncertainty"]
