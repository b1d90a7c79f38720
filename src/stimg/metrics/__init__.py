"""Metrics defined once: regression, spatial, retrieval, uncertainty."""

from ._regression import PearsonResult, mae, mse, pearson

__all__ = ["PearsonResult", "mae", "mse", "pearson"]
