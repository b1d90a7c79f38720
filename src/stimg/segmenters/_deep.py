"""Hooks for deep nucleus segmenters that are used when installed (Cellpose, StarDist); not required."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from .._docs import d

_MODELS: dict[tuple, Any] = {}  # built models, reused across patches


def _need(package: str, install: str) -> None:
    try:
        version(package)
    except PackageNotFoundError:
        msg = (f"The {package!r} segmenter needs the {package} package, which is not installed: `{install}`. "
               "The default segmenter='watershed' needs nothing extra.")
        raise ImportError(msg) from None


def _haematoxylin_u8(image: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density rescaled to uint8 (bright nuclei on a dark background)."""
    from skimage.color import rgb2hed
    from skimage.exposure import rescale_intensity

    h = rgb2hed(image)[..., 0]
    lo, hi = np.percentile(h, (1, 99.8))
    return rescale_intensity(h, in_range=(lo, max(hi, lo + 1e-6)), out_range=(0, 255)).astype(np.uint8)


@d.dedent
def cellpose(image: np.ndarray, *, mpp: float, diameter_um: float = 8.0, gpu: bool = False,
             model_type: str = "nuclei", **eval_kwargs: Any) -> np.ndarray:
    """Nuclei by Cellpose on the haematoxylin channel (as the STImage paper describes).

    The RGB patch is deconvolved (HED) and the haematoxylin optical density, rescaled to 0–255, is
    segmented by Cellpose's ``'nuclei'`` model (Cellpose < 4) or its default model (Cellpose-SAM,
    ≥ 4) at a nucleus diameter of ``diameter_um / mpp`` pixels.

    Parameters
    ----------
    %(seg_image_mpp)s
    diameter_um
        Typical nucleus diameter, µm.
    gpu
        Run Cellpose on the GPU.
    model_type
        Cellpose < 4 model name.
    **eval_kwargs
        Passed to ``CellposeModel.eval`` (e.g. ``flow_threshold``).

    Returns
    -------
    %(seg_labels)s

    Examples
    --------
    >>> labels = segment_nuclei(patch, mpp=0.5, method="cellpose")  # doctest: +SKIP
    """
    _need("cellpose", "pip install cellpose")
    from cellpose import models

    major = int(version("cellpose").split(".")[0])
    key = ("cellpose", major, model_type, bool(gpu))
    if key not in _MODELS:
        kw = {"model_type": model_type} if major < 4 else {}
        _MODELS[key] = models.CellposeModel(gpu=gpu, **kw)
    if major < 4:
        eval_kwargs.setdefault("channels", [0, 0])
    out = _MODELS[key].eval(_haematoxylin_u8(image), diameter=diameter_um / mpp, **eval_kwargs)
    return np.asarray(out[0], dtype=np.int32)


@d.dedent
def stardist(image: np.ndarray, *, mpp: float, model_mpp: float = 0.25, model: str = "2D_versatile_he",
             **predict_kwargs: Any) -> np.ndarray:
    """Nuclei by StarDist's pretrained H&E model.

    The patch is normalised (percentiles 1–99.8) and passed to ``StarDist2D.predict_instances``
    with ``scale = mpp / model_mpp``, so nuclei appear at the size the model was trained on
    (``2D_versatile_he``: MoNuSeg, 40×, about 0.25 µm/px).

    Parameters
    ----------
    %(seg_image_mpp)s
    model_mpp
        µm per pixel of the model's training images.
    model
        Pretrained StarDist model name.
    **predict_kwargs
        Passed to ``predict_instances`` (e.g. ``prob_thresh``, ``nms_thresh``).

    Returns
    -------
    %(seg_labels)s

    Examples
    --------
    >>> labels = segment_nuclei(patch, mpp=0.5, method="stardist")  # doctest: +SKIP
    """
    _need("stardist", "pip install stardist tensorflow")
    from csbdeep.utils import normalize
    from stardist.models import StarDist2D

    key = ("stardist", model)
    if key not in _MODELS:
        _MODELS[key] = StarDist2D.from_pretrained(model)
    x = normalize(image.astype(np.float32), 1, 99.8, axis=(0, 1, 2))
    labels, _ = _MODELS[key].predict_instances(x, scale=mpp / model_mpp, **predict_kwargs)
    return np.asarray(labels, dtype=np.int32)
