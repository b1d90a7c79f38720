"""stimg: spatial gene expression from H&E histology.

``import stimg as si`` gives :mod:`~stimg.pp`, :mod:`~stimg.tl`, :mod:`~stimg.pl`,
:mod:`~stimg.io`, :mod:`~stimg.datasets`, :mod:`~stimg.metrics` and :data:`~stimg.settings`.
``stimg.models`` (torch, scvi-tools) is imported on first use only.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from . import datasets, encoders, io, metrics, pl, pp, segmenters, tl
from ._settings import settings

try:
    __version__ = version("stimg")
except PackageNotFoundError:  # pragma: no cover - source tree without install
    __version__ = "0.0.0"

__all__ = ["datasets", "encoders", "io", "metrics", "models", "pl", "pp", "segmenters", "settings", "tl"]


def __getattr__(name: str):
    if name == "models":  # torch + scvi-tools only on first use
        return importlib.import_module(".models", __name__)
    msg = f"module 'stimg' has no attribute {name!r}"
    raise AttributeError(msg)
