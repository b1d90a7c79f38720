"""Tools: prediction, evaluation, active sampling, annotation, alignment."""

from ._active_sample import active_sample
from ._evaluate import evaluate
from ._predict import predict_expression
from ._simulate import simulate_sampling

__all__ = ["active_sample", "evaluate", "predict_expression", "simulate_sampling"]
