"""A spot's patch with its nuclei coloured by their explanation score, genes side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import TABLE_KEY
from .._spatial import get_table
from .._validate import assert_key_in


def _result(data: Any, key: str, table_key: str, result: dict | None) -> dict:
    if result is not None:
        return result
    table = get_table(data, table_key)
    assert_key_in(table.uns, key, where="table.uns", hint="Run si.tl.explain first (or pass key= its key_added).")
    return table.uns[key]


def explain(
    data: Any,
    spot: str,
    *,
    genes: str | Sequence[str] | None = None,
    key: str = "si_explain",
    result: dict | None = None,
    table_key: str = TABLE_KEY,
    cmap: str = "RdBu_r",
    alpha: float = 0.75,
    outline: bool = True,
    pixel_map: bool = False,
    panel_size: float = 3.0,
    return_fig: bool = False,
):
    """The H&E patch of one spot and, per gene, its nuclei coloured by their score.

    Reads the result of :func:`stimg.tl.explain`. Scores use a diverging colour map centred at 0
    (red: the nucleus raises the predicted expression, blue: lowers it), one symmetric scale per
    gene; each panel's title gives the gene, the predicted log1p expression and the fit.

    Parameters
    ----------
    data
        The SpatialData or AnnData explained (the patch is cut again from its image).
    spot
        Spot (obs name) to draw; it must have been explained.
    genes
        Gene(s) to draw side by side; ``None``: all explained genes (at most 4).
    key
        ``key_added`` of :func:`stimg.tl.explain`.
    result
        The dict returned by :func:`stimg.tl.explain` with ``inplace=False`` (instead of ``key``).
    table_key
        Table of SpatialData input.
    cmap
        Diverging colour map of the scores.
    alpha
        Opacity of the nucleus colours.
    outline
        Draw nucleus outlines.
    pixel_map
        Add a row with the pixel attributions (saliency / integrated gradients only).
    panel_size
        Side of each panel in inches.
    return_fig
        Return the Figure instead of the Axes.

    Returns
    -------
    Array of :class:`~matplotlib.axes.Axes`, or the Figure.

    Examples
    --------
    >>> si.tl.explain(sdata, ensemble, genes=["ERBB2", "CD74"], spots=["C2_20x20"])  # doctest: +SKIP
    >>> si.pl.explain(sdata, "C2_20x20", genes=["ERBB2", "CD74"])  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    from ..pp import extract_patches

    res = _result(data, key, table_key, result)
    spots = res["spots"]
    names = list(spots["spot"].astype(str))
    assert_key_in(names, spot, where=f"the spots explained under {key!r}", hint="Explain it with si.tl.explain first.")
    pos = names.index(spot)
    params = res["params"]
    all_genes = list(params["genes"])
    if genes is None:
        genes = all_genes[:4]
    genes = [genes] if isinstance(genes, str) else list(genes)
    for g in genes:
        assert_key_in(all_genes, g, where=f"the genes explained under {key!r}")
    if pixel_map and "pixel_maps" not in res:
        msg = f"{params['method']!r} explanations have no pixel maps; use pixel_map=False."
        raise ValueError(msg)
    table = get_table(data, table_key)
    row = int(table.obs_names.get_loc(spot))
    ds = extract_patches(data, patch_um=float(params["patch_um"]), patch_px=int(params["patch_px"]),
                         table_key=table_key, library_key=params.get("library_key"),
                         library_id=str(spots["library_id"].iloc[pos]) if params.get("library_key") else None)
    patch = ds.patch(int(np.flatnonzero(ds.obs_index == row)[0]))
    lab = np.asarray(res["labels"][pos])
    nuc = res["nuclei"]
    sel = (nuc["spot"].astype(str) == spot).to_numpy()
    scores = res["scores"].loc[sel]
    order = np.argsort(nuc.loc[sel, "label"].to_numpy())
    summary = res["summary"]
    nrow = 2 if pixel_map else 1
    fig, axs = plt.subplots(nrow, 1 + len(genes), figsize=(panel_size * (1 + len(genes)), panel_size * nrow + 0.3),
                            squeeze=False)
    for a in axs.ravel():
        a.set_axis_off()
    axs[0, 0].imshow(patch)
    axs[0, 0].set_title(f"{spot} ({int(spots['n_nuclei'].iloc[pos])} nuclei)", fontsize=9)
    edge = None
    if outline:
        from skimage.segmentation import find_boundaries

        edge = find_boundaries(lab, mode="inner")
    gray = patch.mean(-1, keepdims=True).repeat(3, -1) / 255.0
    for j, g in enumerate(genes):
        s = scores[g].to_numpy(float)[order] if len(scores) else np.zeros(0)
        vmax = float(np.abs(s).max()) if s.size and np.abs(s).max() > 0 else 1.0
        norm = TwoSlopeNorm(0.0, -vmax, vmax)
        lut = np.zeros((lab.max() + 1, 4))
        lut[1:] = plt.get_cmap(cmap)(norm(s))
        rgba = lut[lab]
        img = gray * (1 - alpha * rgba[..., 3:]) + rgba[..., :3] * alpha * rgba[..., 3:]
        if edge is not None:
            img[edge] = 0.15
        ax = axs[0, j + 1]
        ax.imshow(img)
        srow = summary[(summary["spot"].astype(str) == spot) & (summary["gene"] == g)]
        fit = srow["fit"].iloc[0] if len(srow) else np.nan
        fit_txt = f", R² {fit:.2f}" if params["method"] == "lime" and np.isfinite(fit) else ""
        ax.set_title(f"{g}: pred {srow['prediction'].iloc[0]:.2f}{fit_txt}" if len(srow) else g, fontsize=9)
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
        if pixel_map:
            pm = np.asarray(res["pixel_maps"][pos, all_genes.index(g)])
            m = float(np.percentile(np.abs(pm), 99.5)) or float(np.abs(pm).max()) or 1.0  # a few pixels dominate
            pax = axs[1, j + 1]
            kw = {"cmap": cmap, "vmin": -m, "vmax": m} if pm.min() < 0 else {"cmap": "magma", "vmin": 0, "vmax": m}
            pax.imshow(pm, **kw)
            pax.set_title(f"{g}: pixel attribution", fontsize=9)
    fig.tight_layout()
    return fig if return_fig else axs
