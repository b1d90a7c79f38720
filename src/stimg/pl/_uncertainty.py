"""Prediction, aleatoric and epistemic uncertainty of one gene, side by side."""

from __future__ import annotations

from typing import Any

from .._constants import ALEATORIC_LAYER, EPISTEMIC_LAYER, PRED_LAYER, TABLE_KEY
from .._spatial import get_table, library_column
from .._validate import assert_key_in
from ._spatial import spatial


def uncertainty(
    data: Any,
    gene: str,
    *,
    library_id: str | None = None,
    library_key: str | None = None,
    table_key: str = TABLE_KEY,
    pred_layer: str = PRED_LAYER,
    aleatoric_layer: str = ALEATORIC_LAYER,
    epistemic_layer: str = EPISTEMIC_LAYER,
    true_layer: str | None = None,
    img: bool = True,
    cmap: str = "viridis",
    uncertainty_cmap: str = "magma",
    spot_scale: float = 1.0,
    return_fig: bool = False,
    **kwargs: Any,
):
    """Maps of a gene's prediction, aleatoric and epistemic variance (and, optionally, the measurement).

    Reads the layers written by :func:`stimg.tl.predict_expression` (e.g. with an
    :class:`~stimg.models.NBEnsemble`) and draws one :func:`stimg.pl.spatial` panel per layer for
    one section, spots at true size over the H&E.

    Parameters
    ----------
    data
        SpatialData or AnnData with the prediction layers.
    gene
        Gene to draw.
    library_id
        Section to draw; ``None`` works only for single-section tables.
    library_key
        ``.obs`` column naming each spot's section.
    table_key
        Table of SpatialData input.
    pred_layer, aleatoric_layer, epistemic_layer
        Layers of the prediction and the two variances.
    true_layer
        Layer with the measured values on the prediction's scale (e.g. log1p counts); adds a
        first panel with the same colour scale as the prediction.
    img
        Draw the H&E underneath.
    cmap, uncertainty_cmap
        Colour maps of expression and of the variances.
    spot_scale
        Multiplier of the true spot diameter.
    return_fig
        Return the Figure instead of the Axes.
    **kwargs
        Passed to :func:`stimg.pl.spatial`.

    Returns
    -------
    List of :class:`~matplotlib.axes.Axes` (or the Figure).

    Examples
    --------
    >>> import stimg as si
    >>> si.tl.predict_expression(adata, ensemble)  # doctest: +SKIP
    >>> si.pl.uncertainty(adata, "ERBB2", library_id="C3", true_layer="log1p")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    import numpy as np

    table = get_table(data, table_key)
    assert_key_in(table.var_names, gene, where="table.var_names")
    panels = [(true_layer, "measured", cmap)] if true_layer is not None else []
    panels += [(pred_layer, "prediction", cmap), (aleatoric_layer, "aleatoric var", uncertainty_cmap),
               (epistemic_layer, "epistemic var", uncertainty_cmap)]
    for layer, _, _ in panels:
        assert_key_in(table.layers, layer, where="table.layers",
                      hint="Run si.tl.predict_expression with an ensemble model first.")
    _, libs = library_column(table, library_key)
    if library_id is None:
        uniq = list(libs.unique())
        if len(uniq) > 1:
            msg = f"the table holds {len(uniq)} sections; pass library_id= (one of {uniq[:10]})."
            raise ValueError(msg)
        library_id = uniq[0]
    mask = (libs == str(library_id)).to_numpy()
    if not mask.any():
        msg = f"library_id {library_id!r} not found. Available: {list(libs.unique())[:10]}."
        raise KeyError(msg)
    j = table.var_names.get_loc(gene)
    pred_vals = [np.asarray(table.layers[layer][mask, j], dtype=float) for layer, *_ in panels[: 1 + (true_layer is not None)]]
    finite = np.concatenate([v[np.isfinite(v)] for v in pred_vals])
    if finite.size == 0:
        msg = f"no finite predictions for {gene!r} in {library_id!r}: the model does not predict this gene."
        raise ValueError(msg)
    vmin, vmax = float(finite.min()), float(finite.max())
    fig, axs = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4))
    for a, (layer, name, cm) in zip(axs, panels, strict=True):
        expr = cm == cmap
        spatial(data, gene, table_key=table_key, library_id=str(library_id), library_key=library_key, layer=layer,
                img=img, cmap=cm, vmin=vmin if expr else None, vmax=vmax if expr else None, spot_scale=spot_scale,
                title=f"{gene}: {name}", ax=a, **kwargs)
    fig.suptitle(str(library_id))
    fig.tight_layout()
    return fig if return_fig else list(axs)
