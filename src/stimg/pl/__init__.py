"""Plotting: spatial maps over the H&E, patch galleries, curves."""

from ._spatial import patches, spatial

__all__ = ["patches", "spatial"]
