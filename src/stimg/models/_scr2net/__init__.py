"""SCR²Net (SCR²-ST §2.3): regression with retrieval-augmented soft labels and majority cell-type filtering."""

from ._model import PREDICT_MODES, SCR2Net

__all__ = ["PREDICT_MODES", "SCR2Net"]
