"""Nucleus segmenters: a registry of plug-ins mapping an H&E patch to a nucleus label image.

The default, ``'watershed'``, needs only scikit-image (haematoxylin channel, Otsu, area opening,
distance-transform watershed: what the STImage code calls "Cellpose"). ``'cellpose'`` and
``'stardist'`` run those packages when they are installed. Add your own with
:func:`register_segmenter`. Importing this package does not import torch.
"""

from __future__ import annotations

from ._registry import (
    SEGMENTERS,
    get_segmenter,
    list_segmenters,
    nucleus_morphology,
    register_segmenter,
    segment_nuclei,
)

__all__ = [
    "SEGMENTERS",
    "get_segmenter",
    "list_segmenters",
    "nucleus_morphology",
    "register_segmenter",
    "segment_nuclei",
]
