"""Models (torch, scvi-tools): imported lazily by ``stimg`` and, name by name, here.

Add a model by adding ``"Name": ".module"`` to ``_LAZY``; nothing heavy runs on import.
"""

from __future__ import annotations

import importlib

_LAZY: dict[str, str] = {
    # the one model contract: load any saved model file (issue 14)
    "load_model": "._base",
    # ridge baseline on frozen features (issue 3)
    "RidgeRegressor": "._ridge",
    # NB regressor and ensembles (issue 4)
    "NBRegressor": "._nb",
    "NBEnsemble": "._nb",
    "NBFinetuner": "._nb",
    # active sampling (issue 5)
    "SamplingPolicy": "._sampling._policy",
    "RewardWeights": "._sampling._rewards",
    "SCRLSampler": "._sampling._scrl",
    # single-cell priors (issue 5)
    "SingleCellPrior": "._sc_prior",
    "GeneEncoder": "._sc_prior",
    "ScviGeneEncoder": "._sc_prior",
    "PCAGeneEncoder": "._sc_prior",
    # SCR²Net: regression + retrieval with majority cell-type filtering (issue 9)
    "SCR2Net": "._scr2net",
    # active annotation (issue 10)
    "SpotClassifier": "._classifier",
    # contrastive alignment and retrieval (issue 8)
    "ContrastiveAligner": "._align",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
