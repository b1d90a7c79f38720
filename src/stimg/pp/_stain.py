"""Stain normalisation (Macenko, Vahadane, Reinhard), fitted once per section, applied block- or patch-wise."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._rgb import to_rgb8
from .._spatial import is_spatialdata, sections
from .._validate import assert_key_in

_IO = 240.0
_BETA = 0.15
METHODS = ("macenko", "vahadane", "reinhard")


def _tissue_pixels(rgb: np.ndarray, max_pixels: int = 2_000_000, seed: int = 0) -> np.ndarray:
    """``(n, 3)`` uint8 pixels with optical density above background in every channel."""
    px = rgb.reshape(-1, 3)
    od = -np.log((px.astype(np.float32) + 1) / _IO)
    px = px[(od >= _BETA).all(1)]
    if len(px) < 100:
        msg = "Too few stained pixels to fit a stain model (is the image blank or background only?)."
        raise ValueError(msg)
    if len(px) > max_pixels:
        px = px[np.random.default_rng(seed).choice(len(px), max_pixels, replace=False)]
    return px


def _vahadane_matrix(px: np.ndarray, lam: float = 0.1, n_fit: int = 4000, seed: int = 0) -> np.ndarray:
    """Vahadane et al. 2016: sparse non-negative dictionary of 2 stains on optical densities (3 × 2)."""
    from sklearn.decomposition import DictionaryLearning

    od = -np.log((px.astype(np.float64) + 1) / _IO)
    rng = np.random.default_rng(seed)
    od = od[rng.choice(len(od), min(n_fit, len(od)), replace=False)]
    dl = DictionaryLearning(n_components=2, alpha=lam, positive_dict=True, positive_code=True,
                            fit_algorithm="cd", transform_algorithm="lasso_cd", max_iter=30, random_state=seed)
    dl.fit(od)
    D = dl.components_.T  # (3, 2)
    D = D / np.linalg.norm(D, axis=0, keepdims=True)
    if D[0, 0] < D[0, 1]:  # haematoxylin (more red OD) first
        D = D[:, ::-1]
    return D


def _stain_fit(method: str, px: np.ndarray) -> dict:
    """Stain statistics of a set of tissue pixels."""
    if method == "macenko":
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        n = NumpyMacenkoNormalizer()
        n.fit(px.reshape(-1, 1, 3), Io=_IO, beta=_BETA)
        return {"stains": np.asarray(n.HERef, float), "max_conc": np.asarray(n.maxCRef, float)}
    if method == "vahadane":
        D = _vahadane_matrix(px)
        sub = px[np.random.default_rng(0).choice(len(px), min(len(px), 200_000), replace=False)]
        od = -np.log((sub.astype(np.float64) + 1) / _IO)
        C = np.clip(np.linalg.lstsq(D, od.T, rcond=None)[0], 0, None)
        return {"stains": D, "max_conc": np.percentile(C, 99, axis=1)}
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    n = NumpyReinhardNormalizer()
    n.fit(px.reshape(-1, 1, 3))
    return {"means": np.asarray(n.target_means, float), "stds": np.asarray(n.target_stds, float)}


@dataclass
class StainTransform:
    """Maps one section's stain onto a reference's; call it on ``(y, x, 3)`` uint8 arrays.

    Attributes
    ----------
    method
        ``"macenko"``, ``"vahadane"`` or ``"reinhard"``.
    source
        Stain statistics of the section (stain vectors ``"stains"`` (3 × 2) and ``"max_conc"``,
        or LAB ``"means"``/``"stds"`` for Reinhard).
    target
        The reference's statistics.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.datasets.synthetic(16, 5, n_sections=2)
    >>> tf = si.pp.stain_normalize(sdata, reference="S0", inplace=False)["S1"]
    >>> patch = si.pp.extract_patches(sdata, library_id="S1").patch(0)
    >>> tf(patch).shape == patch.shape
    True
    """

    method: str
    source: dict = field(repr=False)
    target: dict = field(repr=False)

    @property
    def cache_key(self) -> str:
        """Stable identity of this mapping (method and fitted statistics), for feature caches."""
        import hashlib

        h = hashlib.sha256(self.method.encode())
        for stats in (self.source, self.target):
            for k in sorted(stats):
                h.update(k.encode())
                h.update(np.ascontiguousarray(stats[k], dtype=np.float64).tobytes())
        return f"stain-{self.method}-{h.hexdigest()[:16]}"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        shape = rgb.shape
        px = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
        if self.method == "reinhard":
            from torchstain.numpy.utils.lab2rgb import lab2rgb
            from torchstain.numpy.utils.rgb2lab import rgb2lab
            from torchstain.numpy.utils.split import lab_merge, lab_split

            lab = np.stack(lab_split(rgb2lab((px / 255.0).reshape(-1, 1, 3).astype(np.float32))), -1).reshape(-1, 3)
            lab = (lab - self.source["means"]) / np.maximum(self.source["stds"], 1e-6) * self.target["stds"] + self.target["means"]
            lab = lab.reshape(-1, 1, 3)
            out = lab2rgb(lab_merge(lab[..., 0], lab[..., 1], lab[..., 2])).reshape(-1, 3) * 255.0
        else:
            od = -np.log((px + 1) / _IO)
            C = np.linalg.lstsq(self.source["stains"], od.T, rcond=None)[0]
            C *= (self.target["max_conc"] / np.maximum(self.source["max_conc"], 1e-6))[:, None]
            out = (_IO * np.exp(-self.target["stains"] @ C)).T
            background = (od < _BETA).all(1)  # keep glass as it is
            out[background] = px[background]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(shape)


def _rgb_yxc(rgb: Any, where: str) -> np.ndarray:
    """A ``(y, x, 3)`` uint8 view of an RGB(A)/grey/float/16-bit array (refused clearly otherwise)."""
    return np.moveaxis(to_rgb8(np.asarray(rgb), where=where, channel_axis=-1), 0, -1)


def stain_vectors(rgb: np.ndarray, method: str = "macenko") -> np.ndarray:
    """Estimate the (3 × 2) haematoxylin/eosin optical-density vectors of an RGB image.

    Parameters
    ----------
    rgb
        ``(y, x, 3)`` uint8 image or patch (background pixels are ignored).
    method
        ``"macenko"`` or ``"vahadane"``.

    Returns
    -------
    Unit-norm stain vectors as columns (haematoxylin first).

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> rgb = np.random.default_rng(0).integers(60, 200, (64, 64, 3)).astype(np.uint8)
    >>> si.pp.stain_vectors(rgb).shape
    (3, 2)
    """
    if method not in ("macenko", "vahadane"):
        msg = f"method must be 'macenko' or 'vahadane' for stain vectors, got {method!r}."
        raise ValueError(msg)
    return _stain_fit(method, _tissue_pixels(_rgb_yxc(rgb, "rgb")))["stains"]


def _section_pixels(section, working_mpp: float) -> np.ndarray:
    step = max(1, int(round(working_mpp / section.mpp)))
    rgb = np.moveaxis(np.asarray(section.image_array()[:, ::step, ::step]), 0, -1)
    return _tissue_pixels(rgb)


@d.dedent
def stain_normalize(
    data: Any,
    method: str = "macenko",
    *,
    reference: str | np.ndarray | None = None,
    table_key: str = TABLE_KEY,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    image_key: str | dict | None = None,
    working_mpp: float = 2.0,
    key_added: str | None = None,
    inplace: bool = True,
) -> dict[str, StainTransform] | None:
    """Normalise H&E stain towards a reference section or patch.

    Stain statistics are fitted once per section (on tissue pixels read at ``working_mpp``
    µm/px) and once on the reference, then applied pixel-wise — lazily block by block to
    whole images, or patch by patch via ``extract_patches(..., stain=...)``. Macenko and
    Reinhard use :mod:`torchstain`; Vahadane uses a sparse non-negative dictionary
    (scikit-learn), as in Vahadane et al. 2016.

    Parameters
    ----------
    %(data)s
    method
        ``"macenko"``, ``"vahadane"`` or ``"reinhard"``.
    reference
        A section of ``data`` (library id) or an RGB ``(y, x, 3)`` array (e.g. a patch).
        ``None`` uses the first section.
    %(table_key)s
    %(library_id)s
    %(library_key)s
    %(image_key)s
    working_mpp
        Resolution at which stain statistics are fitted.
    key_added
        Suffix of the new image elements (SpatialData): ``{image_key}_{key_added}``;
        ``None`` uses ``method``.
    %(inplace)s

    Returns
    -------
    With ``inplace=False``: ``{library_id: StainTransform}``, to pass as ``stain=`` to
    :func:`~stimg.pp.extract_patches` or :func:`~stimg.pp.embed`. With ``inplace=True``
    (SpatialData only): adds lazily normalised image elements ``{image_key}_{key_added}``
    and records parameters in ``table.uns['stain_{key_added}']``.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.datasets.synthetic(16, 5, n_sections=2)
    >>> tf = si.pp.stain_normalize(sdata, "macenko", reference="S0", inplace=False)
    >>> ds = si.pp.extract_patches(sdata, stain=tf)
    """
    start = time.perf_counter()
    if method not in METHODS:
        msg = f"method must be one of {METHODS}, got {method!r}."
        raise ValueError(msg)
    secs = sections(data, table_key=table_key, library_id=library_id, library_key=library_key, image_key=image_key)
    if isinstance(reference, np.ndarray):
        ref_px = _tissue_pixels(_rgb_yxc(reference, "reference"))
        ref_name = f"array {reference.shape}"
    else:
        all_secs = {s.library_id: s for s in sections(data, table_key=table_key, library_key=library_key, image_key=image_key)}
        ref_name = secs[0].library_id if reference is None else reference
        assert_key_in(all_secs, ref_name, where="the table's sections", hint="reference must be a section or an RGB array.")
        ref_px = _section_pixels(all_secs[ref_name], working_mpp)
    target = _stain_fit(method, ref_px)
    transforms = {s.library_id: StainTransform(method, _stain_fit(method, _section_pixels(s, working_mpp)), target) for s in secs}
    if not inplace:
        return transforms
    if not is_spatialdata(data):
        msg = ("stain_normalize(inplace=True) writes new image elements and needs SpatialData; for AnnData use "
               "inplace=False and pass the result as stain= to extract_patches/embed.")
        raise TypeError(msg)
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    suffix = key_added or method
    new = {}
    for s in secs:
        tf = transforms[s.library_id]
        arr = s.image_array()
        arr = arr if isinstance(arr, da.Array) else da.from_array(arr, chunks=(3, 4096, 4096))
        arr = arr.rechunk((-1, 1024, 1024))
        out = arr.map_blocks(lambda b, tf=tf: np.moveaxis(tf(np.moveaxis(b, 0, -1)), -1, 0), dtype=np.uint8)
        name = f"{s.image_key}_{suffix}"
        if name in data.images:
            msg = f"Image element {name!r} exists already; pass another key_added or delete it first."
            raise KeyError(msg)
        new[name] = Image2DModel.parse(out, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                       transformations=get_transformation(data.images[s.image_key], get_all=True))
    for name, img in new.items():
        data.images[name] = img
        log_added("images", name, start)
    data.tables[table_key].uns[f"stain_{suffix}"] = {"params": {
        "method": method, "reference": ref_name, "working_mpp": working_mpp,
        "images": {s.library_id: f"{s.image_key}_{suffix}" for s in secs}}}
    logger.debug("stain model fitted on %s", ref_name)
    return None
