"""Contrastive image–expression alignment (HESCAPE, BLEEP): module, training plan, model."""

from ._model import ContrastiveAligner

__all__ = ["ContrastiveAligner"]
