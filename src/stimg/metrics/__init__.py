"""Metrics defined once: regression (PCC, MSE, MAE), spatial (Moran's I, pattern IoU), uncertainty calibration."""

from ._regression import PearsonResult, mae, mse, pearson
from ._spatial import morans_i, pattern_iou
from ._uncertainty import CalibrationResult, uncertainty_calibration

__all__ = [
    "CalibrationResult",
    "PearsonResult",
    "mae",
    "morans_i",
    "mse",
    "pattern_iou",
    "pearson",
    "uncertainty_calibration",
]
