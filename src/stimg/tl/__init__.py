"""Tools: prediction, evaluation, classification, splits, active sampling, annotation, alignment, explanations."""

from .._prediction import ExpressionPrediction
from ..models._sampling import Sampler, SamplingContext, list_samplers, register_sampler
from ._active_sample import active_sample
from ._align import align, retrieve
from ._annotate import AnnotationRound, annotate, annotation_summary, predict_annotation, simulate_annotation
from ._annotation_rules import (
    AnnotationRule,
    RandomRule,
    SelectionContext,
    UncertaintyRule,
    annotation_rules,
    entropy,
    least_confidence,
    margin,
    register_annotation_rule,
)
from ._classify import classify_expression
from ._context import choose_spatial_context
from ._evaluate import evaluate
from ._explain import explain
from ._predict import predict_expression
from ._simulate import simulate_sampling
from ._split import check_split_leakage, split_by_patient

__all__ = [
    "AnnotationRound",
    "AnnotationRule",
    "ExpressionPrediction",
    "RandomRule",
    "Sampler",
    "SamplingContext",
    "SelectionContext",
    "UncertaintyRule",
    "active_sample",
    "align",
    "annotate",
    "annotation_rules",
    "annotation_summary",
    "check_split_leakage",
    "choose_spatial_context",
    "classify_expression",
    "entropy",
    "evaluate",
    "explain",
    "least_confidence",
    "list_samplers",
    "margin",
    "predict_annotation",
    "predict_expression",
    "register_annotation_rule",
    "register_sampler",
    "retrieve",
    "simulate_annotation",
    "simulate_sampling",
    "split_by_patient",
]
