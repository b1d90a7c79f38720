"""Tools: prediction, evaluation, active sampling, annotation, alignment."""

from ._predict import predict_expression

__all__ = ["predict_expression"]
