"""Tools: prediction, evaluation, active sampling, annotation, alignment."""

from .._prediction import ExpressionPrediction
from ..models._sampling import Sampler, SamplingContext, list_samplers, register_sampler
from ._active_sample import active_sample
from ._classify import classify_expression
from ._evaluate import evaluate
from ._predict import predict_expression
from ._simulate import simulate_sampling
from ._split import check_split_leakage, split_by_patient

__all__ = [
    "ExpressionPrediction",
    "Sampler",
    "SamplingContext",
    "active_sample",
    "check_split_leakage",
    "classify_expression",
    "evaluate",
    "list_samplers",
    "predict_expression",
    "register_sampler",
    "simulate_sampling",
    "split_by_patient",
]
