"""Cut patches of a physical size around spots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._constants import TABLE_KEY
from .._docs import d
from .._spatial import get_table, sections


def check_spots_on_image(secs) -> None:
    """Raise when spot centres fall outside their section image."""
    for s in secs:
        if s.image is None:
            continue
        _, h, w = s.image.shape
        off = (s.xy[:, 0] < 0) | (s.xy[:, 1] < 0) | (s.xy[:, 0] >= w) | (s.xy[:, 1] >= h)
        if off.any():
            i = int(np.flatnonzero(off)[0])
            msg = (f"{int(off.sum())} of {s.n_obs} spots of {s.library_id!r} lie outside its {w}×{h} image "
                   f"{s.image_key!r} (e.g. table row {int(s.obs_index[i])} at x={s.xy[i, 0]:.0f}, y={s.xy[i, 1]:.0f}): "
                   "the image and the spot coordinates disagree (wrong image, or a missing scale factor/"
                   "transformation); pass the image the coordinates refer to, or drop the spots outside it.")
            raise ValueError(msg)
        if s.mpp is None or not np.isfinite(s.mpp) or s.mpp <= 0:
            msg = (f"µm/px of {s.library_id!r} is unknown; set table.uns['spatial'][{s.library_id!r}]"
                   "['scalefactors']['microns_per_pixel'] or pass spot_diameter_um=.")
            raise ValueError(msg)


@d.dedent
def extract_patches(
    data: Any,
    *,
    patch_um: float = 112.0,
    patch_px: int = 224,
    table_key: str = TABLE_KEY,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    image_key: str | dict | None = None,
    spot_diameter_um: float | None = None,
    pad_value: int = 255,
    stain: Callable[[np.ndarray], np.ndarray] | dict | None = None,
    transform: Callable | None = None,
    cache_bytes: float = 2e9,
):
    """Lazy patches of ``patch_um`` µm around each spot, as a :class:`torch.utils.data.Dataset`.

    The physical size is converted to image pixels with each section's µm/px, so patches
    from sections scanned at different resolutions cover the same tissue area; each crop is
    resized to ``patch_px`` (default 112 µm → 224 px, as HEST). Nothing is read until an
    item is requested.

    Parameters
    ----------
    %(data)s
    patch_um
        Side of the patch in µm.
    patch_px
        Side of the returned patch in pixels.
    %(table_key)s
    %(library_id)s
    %(library_key)s
    %(image_key)s
    spot_diameter_um
        Physical spot diameter when the table does not record it (55 µm Visium default).
    pad_value
        Fill value for windows reaching past the image border (255: white glass).
    stain
        Optional per-patch stain normaliser, ``(y, x, 3) uint8 → (y, x, 3) uint8``, or a dict
        of them per section (as returned by :func:`stimg.pp.stain_normalize` with ``inplace=False``).
    transform
        Applied to each ``(3, patch_px, patch_px)`` uint8 tensor.
    cache_bytes
        Images up to this total size are read into memory once; larger ones are read per window.

    Returns
    -------
    :class:`~stimg.pp.PatchDataset`; item ``i`` belongs to table row ``dataset.obs_index[i]``.

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.datasets.synthetic(16, 5)
    >>> ds = si.pp.extract_patches(sdata, patch_um=112, patch_px=64)
    >>> ds[0].shape
    torch.Size([3, 64, 64])
    """
    from ._patch_dataset import PatchDataset

    if not (np.isfinite(patch_um) and patch_um > 0):
        msg = f"patch_um must be a positive size in µm, got {patch_um!r}."
        raise ValueError(msg)
    if int(patch_px) < 1:
        msg = f"patch_px must be ≥ 1, got {patch_px!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    secs = sections(data, table_key=table_key, library_id=library_id, library_key=library_key,
                    image_key=image_key, spot_diameter_um=spot_diameter_um)
    check_spots_on_image(secs)
    return PatchDataset(secs, table.obs_names.to_numpy(), patch_um=patch_um, patch_px=patch_px,
                        pad_value=pad_value, stain=stain, transform=transform, cache_bytes=cache_bytes)
