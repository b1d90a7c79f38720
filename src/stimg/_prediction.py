"""The contract between expression models and :func:`stimg.tl.predict_expression` (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ExpressionPrediction:
    """Per-spot, per-gene predictions of a model, on the scale named by ``scale``.

    Attributes
    ----------
    mean
        ``(n_obs, n_genes)`` predicted expression.
    var_names
        Genes of the columns.
    scale
        ``"log1p"`` (log1p of counts, the evaluation scale of DESIGN §5) or ``"counts"``.
    aleatoric
        ``(n_obs, n_genes)`` data noise variance (mean of member variances), or ``None``.
    epistemic
        ``(n_obs, n_genes)`` model variance (variance of member means), or ``None``.
    """

    mean: np.ndarray
    var_names: list[str]
    scale: str = "log1p"
    aleatoric: np.ndarray | None = None
    epistemic: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float32)
        n, g = self.mean.shape
        if len(self.var_names) != g:
            msg = f"var_names has {len(self.var_names)} genes but mean has {g} columns."
            raise ValueError(msg)
        for name in ("aleatoric", "epistemic"):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v, dtype=np.float32)
                if v.shape != (n, g):
                    msg = f"{name} must have shape {(n, g)}, got {v.shape}."
                    raise ValueError(msg)
                setattr(self, name, v)
        if self.scale not in ("log1p", "counts"):
            msg = f"scale must be 'log1p' or 'counts', got {self.scale!r}."
            raise ValueError(msg)
