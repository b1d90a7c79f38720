"""Write a model's predictions into the table."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from .._constants import ALEATORIC_LAYER, EPISTEMIC_LAYER, PRED_LAYER, TABLE_KEY, UNCERTAINTY_OBS
from .._docs import d
from .._logging import log_added
from .._prediction import ExpressionPrediction
from .._spatial import get_table
from .._validate import check_matrix


@d.dedent
def predict_expression(
    data: Any,
    model: Any,
    *,
    table_key: str = TABLE_KEY,
    key_added: str = PRED_LAYER,
    inplace: bool = True,
    **kwargs: Any,
) -> ExpressionPrediction | None:
    """Predict gene expression for every spot (or tile) with a trained model.

    ``model`` is any object with ``predict(adata, **kwargs) -> ExpressionPrediction``, e.g.
    :class:`stimg.models.RidgeRegressor` or :class:`stimg.models.NBRegressor` (ensembles included).
    Models with ``needs_images = True`` (:class:`stimg.models.NBFinetuner`) get ``data`` itself
    (and ``table_key``), as they read the image patches.

    Parameters
    ----------
    %(data)s
    model
        Trained model.
    %(table_key)s
    key_added
        Layer for the predicted mean. Uncertainties go to ``'si_aleatoric'``/``'si_epistemic'``.
    %(inplace)s
    **kwargs
        Passed to ``model.predict``.

    Returns
    -------
    With ``inplace=False`` the :class:`~stimg.tl.ExpressionPrediction`; otherwise ``None``
    and the table gets

    - ``.layers[key_added]``: predicted mean (NaN for genes the model does not predict),
    - ``.layers['si_aleatoric']``, ``.layers['si_epistemic']``: variances, when the model has them,
    - ``.obs['si_uncertainty']``: per-spot mean predictive variance over predicted genes
      (plus ``.obs['si_aleatoric']``, ``.obs['si_epistemic']``),
    - ``.var['si_predicted']``: genes the model predicts,
    - ``.uns[key_added]['params']``.

    Examples
    --------
    >>> import stimg as si
    >>> si.tl.predict_expression(adata, model)  # doctest: +SKIP
    >>> adata.layers["si_pred"]  # doctest: +SKIP
    """
    start = time.perf_counter()
    table = get_table(data, table_key)
    if table.n_obs == 0:
        msg = "The table has no spots (n_obs == 0): nothing to predict; check the filtering that produced it."
        raise ValueError(msg)
    if not hasattr(model, "predict"):
        msg = f"{type(model).__name__} has no predict(adata) method; pass a trained stimg model."
        raise TypeError(msg)
    if getattr(model, "needs_images", False) is True:  # image models (NBFinetuner) read patches from data
        pred = model.predict(data, table_key=table_key, **kwargs)
    else:
        pred = model.predict(table, **kwargs)
    if not isinstance(pred, ExpressionPrediction):
        msg = f"{type(model).__name__}.predict must return an ExpressionPrediction, got {type(pred).__name__}."
        raise TypeError(msg)
    check_matrix(pred.mean, "predicted mean", n_obs=table.n_obs, n_cols=len(pred.var_names))
    missing = pd.Index(pred.var_names).difference(table.var_names)
    if len(missing):
        msg = (f"The model predicts {len(missing)} genes absent from the table (e.g. {list(missing[:3])}); predictions "
               "are written per gene: build the table with the model's genes (e.g. si.pp.tile_image(..., "
               "genes=model.genes_)), or pass inplace=False to get the ExpressionPrediction.")
        raise KeyError(msg)
    if not inplace:
        return pred
    cols = table.var_names.get_indexer(pred.var_names)

    def _full(x: np.ndarray) -> np.ndarray:
        out = np.full((table.n_obs, table.n_vars), np.nan, dtype=np.float32)
        out[:, cols] = x
        return out

    table.layers[key_added] = _full(pred.mean)
    log_added("layers", key_added, start)
    total = np.zeros(table.n_obs, dtype=np.float64)
    for name, layer in (("aleatoric", ALEATORIC_LAYER), ("epistemic", EPISTEMIC_LAYER)):
        v = getattr(pred, name)
        if v is None:
            continue
        table.layers[layer] = _full(v)
        table.obs[layer] = v.mean(1)
        total += v.mean(1)
        log_added("layers", layer)
    if pred.aleatoric is not None or pred.epistemic is not None:
        table.obs[UNCERTAINTY_OBS] = total
        log_added("obs", UNCERTAINTY_OBS)
    table.var["si_predicted"] = np.isin(np.arange(table.n_vars), cols)
    table.uns[key_added] = {"params": {"model": type(model).__name__, "scale": pred.scale,
                                       "genes": list(pred.var_names), "table_key": table_key}}
    return None
