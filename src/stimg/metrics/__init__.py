"""Metrics defined once: regression, spatial, retrieval, uncertainty."""

from ._classification import misclassified, weighted_f1
from ._regression import PearsonResult, mae, mse, pearson
from ._spatial import morans_i, pattern_iou
from ._uncertainty import CalibrationResult, uncertainty_calibration

__all__ = [
    "CalibrationResult",
    "PearsonResult",
    "mae",
    "misclassified",
    "morans_i",
    "mse",
    "pattern_iou",
    "pearson",
    "uncertainty_calibration",
    "weighted_f1",
]
