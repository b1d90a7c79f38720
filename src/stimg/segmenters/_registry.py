"""The segmenter registry, the one entry point :func:`segment_nuclei`, and nucleus morphology."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from .._docs import d

SEGMENTERS: dict[str, Callable[..., np.ndarray]] = {}

# shared parameter fragments of the segmenter functions
d.params.update(
    seg_image_mpp="""image
    ``(H, W, 3)`` uint8 RGB patch.
mpp
    µm per pixel.""",
    seg_labels="""``(H, W)`` int32 labels: ``0`` background, one positive id per nucleus.""",
)


def register_segmenter(name: str, fn: Callable[..., np.ndarray], *, overwrite: bool = False) -> None:
    """Add a nucleus segmenter to the registry.

    Parameters
    ----------
    name
        Registry name (the ``segmenter=`` argument of :func:`stimg.tl.explain`).
    fn
        ``fn(image, *, mpp, **kwargs) -> labels``: ``image`` is an ``(H, W, 3)`` uint8 RGB H&E
        patch at ``mpp`` µm per pixel; ``labels`` an ``(H, W)`` integer image, ``0`` for
        background and one positive id per nucleus.
    overwrite
        Replace an existing entry of the same name.

    Examples
    --------
    >>> import numpy as np
    >>> from stimg.segmenters import register_segmenter, segment_nuclei
    >>> def darkest(image, *, mpp):
    ...     return (image.mean(-1) < 100).astype(np.int32)  # one "nucleus": all dark pixels
    >>> register_segmenter("darkest", darkest, overwrite=True)
    >>> segment_nuclei(np.full((8, 8, 3), 50, np.uint8), mpp=0.5, method="darkest").max()
    np.int32(1)
    """
    if not callable(fn):
        msg = f"fn must be a function (image, *, mpp, **kwargs) -> labels, got {type(fn).__name__}."
        raise TypeError(msg)
    if name in SEGMENTERS and not overwrite:
        msg = f"Segmenter {name!r} is already registered; pass overwrite=True to replace it."
        raise ValueError(msg)
    SEGMENTERS[name] = fn


def list_segmenters() -> list[str]:
    """Names of the registered segmenters.

    Examples
    --------
    >>> from stimg.segmenters import list_segmenters
    >>> list_segmenters()[:3]
    ['watershed', 'cellpose', 'stardist']
    """
    return list(SEGMENTERS)


def get_segmenter(method: str | Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """The segmenter function registered as ``method`` (a function is returned as is).

    Examples
    --------
    >>> from stimg.segmenters import get_segmenter
    >>> get_segmenter("watershed").__name__
    'watershed'
    """
    if callable(method):
        return method
    if method not in SEGMENTERS:
        msg = (f"Unknown segmenter {method!r}. Registered: {list(SEGMENTERS)}; add one with "
               "stimg.segmenters.register_segmenter or pass a function (image, *, mpp) -> labels.")
        raise KeyError(msg)
    return SEGMENTERS[method]


def _check_image(image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        msg = f"image must be an (H, W, 3) RGB array, got shape {img.shape}."
        raise ValueError(msg)
    img = img[..., :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and np.nanmax(img) <= 1.0 and np.nanmin(img) >= 0.0:
            img = np.rint(img * 255).astype(np.uint8)
        elif np.issubdtype(img.dtype, np.integer) and img.min() >= 0 and img.max() <= 255:
            img = img.astype(np.uint8)
        else:
            msg = (f"image must be uint8 RGB (or float in [0, 1]), got {img.dtype} in "
                   f"[{np.nanmin(img)}, {np.nanmax(img)}]; rescale it to 0–255 first.")
            raise ValueError(msg)
    return img


def segment_nuclei(image: Any, *, mpp: float, method: str | Callable[..., np.ndarray] = "watershed",
                   **kwargs: Any) -> np.ndarray:
    """Segment the nuclei of an H&E patch into a label image.

    Parameters
    ----------
    image
        ``(H, W, 3)`` uint8 RGB patch (float in ``[0, 1]`` is accepted).
    mpp
        µm per pixel of ``image`` (sizes of the segmenters are given in µm).
    method
        A registered name (:func:`list_segmenters`) or a function ``(image, *, mpp, **kwargs) -> labels``.
    **kwargs
        Passed to the segmenter (e.g. ``min_area_um2`` of ``'watershed'``).

    Returns
    -------
    ``(H, W)`` int32 labels: ``0`` background, nuclei numbered ``1 … n`` without gaps.

    Examples
    --------
    >>> import numpy as np
    >>> from stimg.segmenters import segment_nuclei
    >>> img = np.full((64, 64, 3), 235, np.uint8)
    >>> yy, xx = np.mgrid[:64, :64]
    >>> for cy, cx in [(16, 16), (44, 40)]:
    ...     img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (60, 40, 120)  # two haematoxylin-dark discs
    >>> segment_nuclei(img, mpp=0.5).max()
    np.int32(2)
    """
    from skimage.segmentation import relabel_sequential

    if not (np.isfinite(mpp) and mpp > 0):
        msg = f"mpp must be a positive number of µm per pixel, got {mpp!r}."
        raise ValueError(msg)
    img = _check_image(image)
    fn = get_segmenter(method)
    labels = np.asarray(fn(img, mpp=float(mpp), **kwargs))
    if labels.shape != img.shape[:2]:
        msg = f"segmenter {method!r} returned labels of shape {labels.shape} for an image of shape {img.shape[:2]}."
        raise ValueError(msg)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        msg = f"segmenter {method!r} must return non-negative integer labels, got {labels.dtype}."
        raise ValueError(msg)
    return relabel_sequential(labels.astype(np.int32))[0].astype(np.int32)


def nucleus_morphology(labels: np.ndarray, *, mpp: float, image: np.ndarray | None = None) -> pd.DataFrame:
    """Size and shape of every nucleus of a label image, in µm.

    Parameters
    ----------
    labels
        ``(H, W)`` integer labels (``0`` background), e.g. from :func:`segment_nuclei`.
    mpp
        µm per pixel of ``labels``.
    image
        The RGB patch, to add the mean haematoxylin optical density of each nucleus.

    Returns
    -------
    :class:`~pandas.DataFrame` indexed by label: ``centroid_x``, ``centroid_y`` (pixels),
    ``area_um2``, ``perimeter_um``, ``major_axis_um``, ``minor_axis_um``, ``eccentricity``
    (0 for a circle, towards 1 for elongated nuclei), ``solidity`` and ``haematoxylin``.

    Examples
    --------
    >>> import numpy as np
    >>> from stimg.segmenters import nucleus_morphology
    >>> lab = np.zeros((20, 20), np.int32); lab[5:9, 5:15] = 1
    >>> m = nucleus_morphology(lab, mpp=0.5)
    >>> float(m.loc[1, "area_um2"]), round(float(m.loc[1, "eccentricity"]), 2)
    (10.0, 0.92)
    """
    from skimage.measure import regionprops_table

    props = ["label", "centroid", "area", "perimeter", "major_axis_length", "minor_axis_length",
             "eccentricity", "solidity"]
    inten = None
    if image is not None:
        from skimage.color import rgb2hed

        inten = rgb2hed(_check_image(image))[..., 0]
        props.append("intensity_mean")
    t = regionprops_table(np.asarray(labels, dtype=np.int32), intensity_image=inten, properties=props)
    df = pd.DataFrame({
        "centroid_x": t["centroid-1"], "centroid_y": t["centroid-0"],
        "area_um2": t["area"] * mpp**2, "perimeter_um": t["perimeter"] * mpp,
        "major_axis_um": t["major_axis_length"] * mpp, "minor_axis_um": t["minor_axis_length"] * mpp,
        "eccentricity": t["eccentricity"], "solidity": t["solidity"],
    }, index=pd.Index(t["label"].astype(np.int64), name="label"))
    if inten is not None:
        df["haematoxylin"] = t["intensity_mean"]
    return df


def _register_builtins() -> None:
    from ._deep import cellpose, stardist
    from ._watershed import watershed

    for name, fn in (("watershed", watershed), ("cellpose", cellpose), ("stardist", stardist)):
        register_segmenter(name, fn, overwrite=True)


_register_builtins()
