"""Metrics defined once: regression, spatial, retrieval, uncertainty."""

from ._regression import PearsonResult, mae, mse, pearson
from ._retrieval import RecallResult, recall_at_k, silhouette_batch
from ._spatial import morans_i, pattern_iou
from ._uncertainty import CalibrationResult, uncertainty_calibration

__all__ = [
    "CalibrationResult",
    "PearsonResult",
    "RecallResult",
    "mae",
    "morans_i",
    "mse",
    "pattern_iou",
    "pearson",
    "recall_at_k",
    "silhouette_batch",
    "uncertainty_calibration",
]
