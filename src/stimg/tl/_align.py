"""Joint image–expression embeddings and prediction by retrieval (HESCAPE, BLEEP; DESIGN §4)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import PRED_LAYER, TABLE_KEY
from .._docs import d
from .._logging import log_added
from .._spatial import get_table
from ._predict import predict_expression


def _check_model(model: Any, what: str) -> None:
    if not hasattr(model, "get_latent_representation") or not hasattr(model, "has_expression"):
        msg = (f"{what} needs a trained stimg.models.ContrastiveAligner (or a model with "
               f"get_latent_representation/has_expression), got {type(model).__name__}.")
        raise TypeError(msg)


@d.dedent
def align(
    data: Any,
    model: Any,
    *,
    table_key: str = TABLE_KEY,
    layer: str | None = None,
    key_added: str = "si_align",
    inplace: bool = True,
) -> dict[str, np.ndarray] | None:
    """Embed spots (or tiles) into a trained aligner's joint image–expression space.

    The image side needs only the model's image features in ``.obsm``; the expression side is
    added where counts of the model's genes (or its gene latent) exist — not at all for a table
    of H&E tiles, and as NaN rows for spots whose counts are missing.

    Parameters
    ----------
    %(data)s
    model
        Trained :class:`~stimg.models.ContrastiveAligner`.
    %(table_key)s
    layer
        Raw-count layer (``None``: the layer the model was set up with).
    key_added
        Prefix of the written keys.
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` a dict ``{'image': array, 'gene': array}`` (``'gene'`` only where
    counts exist); otherwise ``None`` and the table gets

    - ``.obsm[f'{key_added}_image']``: unit-norm image embeddings ``(n_obs, n_latent)``,
    - ``.obsm[f'{key_added}_gene']``: unit-norm expression embeddings (when the table has counts),
    - ``.uns[key_added]['params']``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 30, image=False, as_anndata=True)
    >>> si.models.ContrastiveAligner.setup_anndata(adata, embedding_key="X_synthetic", genes=adata.var_names)
    >>> model = si.models.ContrastiveAligner(adata, n_latent=16)
    >>> model.train(max_epochs=2, batch_size=64, progress=False)
    >>> si.tl.align(adata, model)
    >>> sorted(k for k in adata.obsm if k.startswith("si_align"))
    ['si_align_gene', 'si_align_image']
    """
    start = time.perf_counter()
    _check_model(model, "si.tl.align")
    table = get_table(data, table_key)
    out = {"image": model.get_latent_representation(data, modality="image", table_key=table_key)}
    if model.has_expression(table, layer=layer):
        out["gene"] = model.get_latent_representation(table, modality="gene", layer=layer)
    if not inplace:
        return out
    keys = {side: f"{key_added}_{side}" for side in out}
    ours = isinstance(table.uns.get(key_added), dict) and "params" in table.uns[key_added]
    clash = [k for k in keys.values() if k in table.obsm and not ours]
    if clash:
        msg = (f".obsm already holds {clash}, not written by si.tl.align; pass another key_added= or delete "
               "them first (stimg never overwrites your keys).")
        raise KeyError(msg)
    if ours:  # replace our own earlier result completely (no stale gene side)
        for side in ("image", "gene"):
            table.obsm.pop(f"{key_added}_{side}", None)
    for side, key in keys.items():
        table.obsm[key] = out[side]
        log_added("obsm", key, start)
    table.uns[key_added] = {"params": {"model": type(model).__name__, "sides": sorted(out),
                                       "temperature": float(model.temperature), "layer": layer,
                                       "table_key": table_key}}
    return None


@d.dedent
def retrieve(
    data: Any,
    model: Any,
    *,
    reference: Any = None,
    k: int = 50,
    weighting: str = "mean",
    genes: Sequence[str] | None = None,
    reference_layer: str | None = None,
    table_key: str = TABLE_KEY,
    key_added: str = PRED_LAYER,
    inplace: bool = True,
):
    """Predict expression of spots or tiles from their images by retrieval (BLEEP); no counts needed.

    Each query's image embedding retrieves the ``k`` reference spots with the most similar
    expression embeddings; the prediction is the mean of their ``log1p`` profiles, plain (BLEEP,
    the default) or weighted by similarity.
    The reference is any table with measured counts (e.g. the training sections), or the model's
    own bank of training spots. Written through :func:`stimg.tl.predict_expression`.

    Parameters
    ----------
    %(data)s
    model
        Trained :class:`~stimg.models.ContrastiveAligner`.
    reference
        AnnData or SpatialData with raw counts (and, for a gene-latent model, the latent in
        ``.obsm``); ``None`` uses the model's bank.
    k
        Number of retrieved reference spots.
    weighting
        ``'mean'`` (BLEEP's plain average), ``'similarity'`` (weights ∝ cosine) or ``'softmax'``
        (``softmax(cos / T)`` at the learnt temperature).
    genes
        Genes to predict (``None``: the model's genes; with ``reference``, any of its genes).
    reference_layer
        Raw-count layer of ``reference`` (``None``: the model's layer).
    %(table_key)s
    key_added
        Layer of the prediction.
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` the :class:`~stimg.tl.ExpressionPrediction`; otherwise ``None`` and
    the table gets ``.layers[key_added]`` (``log1p`` scale, NaN for genes not predicted),
    ``.var['si_predicted']`` and ``.uns[key_added]['params']`` (with the retrieval settings).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(200, 30, image=False, as_anndata=True)
    >>> si.models.ContrastiveAligner.setup_anndata(adata, embedding_key="X_synthetic", genes=adata.var_names)
    >>> model = si.models.ContrastiveAligner(adata, n_latent=16)
    >>> model.train(max_epochs=2, batch_size=64, progress=False)
    >>> tiles = adata[:20].copy()
    >>> tiles.X = None  # no counts needed
    >>> si.tl.retrieve(tiles, model, reference=adata, k=10)
    >>> tiles.layers["si_pred"].shape
    (20, 30)
    """
    _check_model(model, "si.tl.retrieve")
    kwargs = {"reference": reference, "k": k, "weighting": weighting, "genes": genes, "layer": reference_layer}
    res = predict_expression(data, model, table_key=table_key, key_added=key_added, inplace=inplace, **kwargs)
    if inplace:
        table = get_table(data, table_key)
        table.uns[key_added]["params"].update({
            "method": "retrieval", "k": int(k), "weighting": weighting,
            "reference": "model bank" if reference is None else f"table of {get_table(reference).n_obs} spots",
        })
    return res
