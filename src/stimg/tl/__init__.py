"""Tools: prediction, evaluation, active sampling, annotation, alignment."""

from .._prediction import ExpressionPrediction
from ._active_sample import active_sample
from ._align import align, retrieve
from ._classify import classify_expression
from ._evaluate import evaluate
from ._predict import predict_expression
from ._simulate import simulate_sampling
from ._split import check_split_leakage, split_by_patient

__all__ = [
    "ExpressionPrediction",
    "active_sample",
    "align",
    "check_split_leakage",
    "classify_expression",
    "evaluate",
    "predict_expression",
    "retrieve",
    "simulate_sampling",
    "split_by_patient",
]
