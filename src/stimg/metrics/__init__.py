"""Metrics defined once: regression (PCC, MSE, MAE), spatial (Moran's I, pattern IoU), uncertainty calibration."""

from ._classification import misclassified, weighted_f1
from ._regression import PearsonResult, mae, mse, pearson
from ._retrieval import RecallResult, recall_at_k, silhouette_batch
from ._spatial import morans_i, pattern_iou
from ._uncertainty import CalibrationResult, uncertainty_calibration

__all__ = [
    "CalibrationResult",
    "PearsonResult",
    "RecallResult",
    "mae",
    "misclassified",
    "morans_i",
    "mse",
    "pattern_iou",
    "pearson",
    "recall_at_k",
    "silhouette_batch",
    "uncertainty_calibration",
    "weighted_f1",
]
