"""Spots at true size over the H&E."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY
from .._spatial import get_table, sections
from .._validate import assert_key_in

_MAX_SIDE = 2000  # image pixels drawn per panel (the image is strided down to this)


def _values(table, color: str, layer: str | None) -> tuple[pd.Series, str]:
    """Values of ``color``: an obs column, a gene (X or ``layer``), or ``'<obsm key>:<column>'``."""
    if color in table.obs:
        return table.obs[color], color
    if color in table.var_names:
        if layer is not None:
            assert_key_in(table.layers, layer, where="table.layers")
        col = table.var_names.get_loc(color)
        X = table.layers[layer] if layer is not None else table.X
        x = X[:, col]
        x = x.toarray().ravel() if hasattr(x, "toarray") else np.asarray(x).ravel()
        return pd.Series(x, index=table.obs_names), f"{color}" + (f" ({layer})" if layer else "")
    if ":" in color:
        key, col = color.rsplit(":", 1)
        if key in table.obsm:
            m = table.obsm[key]
            if isinstance(m, pd.DataFrame):
                assert_key_in(m.columns, col, where=f"obsm[{key!r}] columns")
                return pd.Series(m[col].to_numpy(), index=table.obs_names), color
            try:
                j = int(col)
            except ValueError:
                msg = f"Column of obsm[{key!r}] must be an integer index, got {col!r}."
                raise KeyError(msg) from None
            if not 0 <= j < np.asarray(m).shape[1]:
                msg = f"obsm[{key!r}] has {np.asarray(m).shape[1]} columns; {j} is out of range."
                raise KeyError(msg)
            return pd.Series(np.asarray(m)[:, j], index=table.obs_names), color
    msg = (f"{color!r} is neither an obs column, a gene, nor '<obsm key>:<column>'. "
           f"obs columns: {list(table.obs.columns)[:20]}; obsm keys: {list(table.obsm.keys())}.")
    raise KeyError(msg)


_UNITS = {  # colour-bar labels of the layers and columns stimg writes
    "si_pred": "predicted log1p(counts)",
    "si_aleatoric": "aleatoric variance, log1p(counts)²",
    "si_epistemic": "epistemic variance, log1p(counts)²",
    "si_uncertainty": "predictive variance, log1p(counts)²",
    "log1p": "log1p(counts)",
    "tissue_coverage": "tissue fraction",
}


def _colorbar_label(table, color: str, layer: str | None) -> str:
    """Quantity and unit of a continuous colour (counts, log1p counts, variances)."""
    if color in table.obs:
        return _UNITS.get(color, color)
    if color in table.var_names:
        if layer is None:
            return "counts"  # X holds raw counts (stimg's readers)
        info = table.uns.get(layer)
        scale = info.get("params", {}).get("scale") if isinstance(info, dict) else None
        if scale is not None:  # a prediction layer of si.tl.predict_expression
            return "predicted counts" if scale == "counts" else "predicted log1p(counts)"
        return _UNITS.get(layer, layer)
    return color


def spatial(
    data: Any,
    color: str | None = None,
    *,
    table_key: str = TABLE_KEY,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    image_key: str | dict | None = None,
    layer: str | None = None,
    img: bool = True,
    cmap: str = "viridis",
    palette: dict | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.8,
    spot_scale: float = 1.0,
    crop: bool = True,
    title: str | None = None,
    ncols: int = 3,
    ax: Any = None,
    legend: bool = True,
    colorbar_label: str | None = None,
    shape: str = "circle",
    return_fig: bool = False,
):
    """Spots drawn at their true size over the H&E, coloured by any obs column, gene, layer or obsm column.

    Parameters
    ----------
    data
        SpatialData or AnnData (scanpy ``.uns['spatial']`` layout).
    color
        An ``.obs`` column (categorical or continuous), a gene (from ``X`` or ``layer``), or
        ``'<obsm key>:<column>'``. ``None`` draws spot outlines only.
    table_key
        Table of SpatialData input.
    library_id
        Section(s) to draw, one panel each. ``None`` draws all.
    library_key
        ``.obs`` column naming each spot's section.
    image_key
        Image element (SpatialData) or ``'hires'``/``'lowres'`` (AnnData).
    layer
        Layer to read genes from.
    img
        Draw the H&E underneath.
    cmap, palette, vmin, vmax, alpha
        Colouring of continuous values (``cmap``, shared ``vmin``/``vmax`` over panels) and
        categories (``palette``: category → colour).
    spot_scale
        Multiplier of the true spot diameter.
    crop
        Zoom to the spots (plus a margin of two spot diameters) instead of the whole image.
    title
        Panel title; default ``'{library_id}: {color}'``.
    ncols
        Panels per row.
    ax
        Axes to draw into (one per section).
    legend
        Draw a colour bar / category legend.
    colorbar_label
        Label of the colour bar; ``None`` names the quantity and its unit (``'counts'``,
        ``'log1p(counts)'``, ``'predicted log1p(counts)'``, variances of log1p counts, …).
    shape
        ``'circle'`` (spots) or ``'square'`` (tiles of :func:`stimg.pp.tile_image`: a heat map).
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    :class:`~matplotlib.axes.Axes` (one section), a list of them, or the Figure.

    Examples
    --------
    >>> import stimg as si
    >>> ax = si.pl.spatial(si.datasets.synthetic(16, 5), "cell_type")
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection, PolyCollection
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.lines import Line2D

    if shape not in ("circle", "square"):
        msg = f"shape must be 'circle' or 'square', got {shape!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    secs = sections(data, table_key=table_key, library_id=library_id, library_key=library_key,
                    image_key=image_key, need_image=img)
    vals, label = (None, "") if color is None else _values(table, color, layer)
    categorical = vals is not None and (isinstance(vals.dtype, pd.CategoricalDtype) or vals.dtype == object or vals.dtype == bool)
    if vals is not None and categorical:
        cats = list(vals.astype("category").cat.categories)
        if palette is None:
            base = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
            palette = {c: base(i % base.N) for i, c in enumerate(cats)}
    elif vals is not None:
        num = vals.to_numpy(dtype=float)
        finite = num[np.isfinite(num)]
        norm = Normalize(vmin if vmin is not None else (finite.min() if finite.size else 0),
                         vmax if vmax is not None else (finite.max() if finite.size else 1))
    if ax is None:
        n = len(secs)
        nc = min(ncols, n)
        nr = int(np.ceil(n / nc))
        fig, axs = plt.subplots(nr, nc, figsize=(5 * nc, 5 * nr), squeeze=False)
        axs = list(axs.ravel())
        for extra in axs[n:]:
            extra.set_axis_off()
        axs = axs[:n]
    else:
        axs = list(np.atleast_1d(ax))
        if len(axs) != len(secs):
            msg = f"ax holds {len(axs)} axes for {len(secs)} sections."
            raise ValueError(msg)
        fig = axs[0].figure
    for a, s in zip(axs, secs, strict=True):
        if img and s.image is not None:
            _, h, w = s.image.shape
            step = max(1, int(np.ceil(max(h, w) / _MAX_SIDE)))
            arr = np.moveaxis(np.asarray(s.image_array()[:, ::step, ::step]), 0, -1)
            a.imshow(arr, extent=(0, arr.shape[1] * step, arr.shape[0] * step, 0))
        d = s.spot_diameter_px * spot_scale
        if vals is None:
            fc = "none"
            ec = "k"
        elif categorical:
            v = vals.to_numpy()[s.obs_index]
            fc = [to_rgba(palette.get(x, "lightgrey"), max(alpha, 0.95)) if not pd.isna(x) else (0.8, 0.8, 0.8, 0.3) for x in v]
            ec = "none"
        else:
            fc, ec = None, "none"
        if shape == "square":
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * d / 2
            coll = PolyCollection(s.xy[:, None, :] + corners[None], facecolors=fc, edgecolors=ec, linewidths=0.5)
        else:
            coll = EllipseCollection(d, d, 0, units="xy", offsets=s.xy, offset_transform=a.transData,
                                     facecolors=fc, edgecolors=ec, linewidths=0.5)
        if vals is not None and not categorical:
            coll.set_array(np.ma.masked_invalid(vals.to_numpy(dtype=float)[s.obs_index]))
            coll.set_cmap(cmap)
            coll.set_norm(norm)
            coll.set_alpha(alpha)
        a.add_collection(coll)
        pad = 2 * d
        if crop or not (img and s.image is not None):
            a.set_xlim(s.xy[:, 0].min() - pad, s.xy[:, 0].max() + pad)
            a.set_ylim(s.xy[:, 1].max() + pad, s.xy[:, 1].min() - pad)
        a.set_aspect("equal")
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(title if title is not None else (f"{s.library_id}: {label}" if label else s.library_id))
        if legend and vals is not None and not categorical:
            cb = fig.colorbar(coll, ax=a, shrink=0.7)
            cb.set_label(colorbar_label if colorbar_label is not None else _colorbar_label(table, color, layer))
    if legend and vals is not None and categorical:
        handles = [Line2D([], [], marker="o", ls="", color=palette[c], label=str(c)) for c in cats]
        axs[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title=label)
    if return_fig:
        return fig
    return axs[0] if len(axs) == 1 else axs


def patches(dataset, indices: Sequence[int] | None = None, *, n: int = 16, ncols: int = 8, titles: Sequence[str] | None = None,
            seed: int = 0, return_fig: bool = False):
    """A gallery of patches from :func:`stimg.pp.extract_patches`.

    Parameters
    ----------
    dataset
        A :class:`~stimg.pp.PatchDataset`.
    indices
        Items to show; ``None`` draws ``n`` at random.
    n
        Number of random patches when ``indices`` is ``None``.
    ncols
        Patches per row.
    titles
        One title per patch; default the spot name.
    seed
        Seed of the random draw.
    return_fig
        Return the Figure instead of the Axes array.

    Returns
    -------
    Array of :class:`~matplotlib.axes.Axes`, or the Figure.

    Examples
    --------
    >>> import stimg as si
    >>> ds = si.pp.extract_patches(si.datasets.synthetic(16, 5), patch_px=32)
    >>> axs = si.pl.patches(ds, n=4)
    """
    import matplotlib.pyplot as plt

    if indices is None:
        k = min(n, len(dataset))
        indices = np.sort(np.random.default_rng(seed).choice(len(dataset), k, replace=False))
    indices = [int(i) for i in indices]
    if not indices:
        msg = "No patches to show."
        raise ValueError(msg)
    if bad := [i for i in indices if not -len(dataset) <= i < len(dataset)]:
        msg = f"indices {bad[:5]} are out of range for a dataset of {len(dataset)} patches."
        raise IndexError(msg)
    nc = min(ncols, len(indices))
    nr = int(np.ceil(len(indices) / nc))
    fig, axs = plt.subplots(nr, nc, figsize=(1.6 * nc, 1.75 * nr), squeeze=False)
    for a in axs.ravel():
        a.set_axis_off()
    for j, (a, i) in enumerate(zip(axs.ravel(), indices, strict=False)):
        a.imshow(dataset.patch(int(i)))
        a.set_title(titles[j] if titles is not None else str(dataset.obs_names[int(i)]), fontsize=7)
    return fig if return_fig else axs
