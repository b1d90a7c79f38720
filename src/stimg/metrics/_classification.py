"""Classification metrics defined once: weighted F1 and the share of misclassified spots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _labels(y_true: Sequence, y_pred: Sequence) -> tuple[np.ndarray, np.ndarray]:
    t = pd.Series(np.asarray(y_true, dtype=object))
    p = pd.Series(np.asarray(y_pred, dtype=object))
    if len(t) != len(p):
        msg = f"y_true and y_pred must have the same length, got {len(t)} and {len(p)}."
        raise ValueError(msg)
    if len(t) == 0:
        msg = "y_true is empty; pass at least one spot."
        raise ValueError(msg)
    for name, s in (("y_true", t), ("y_pred", p)):
        if n_na := int(s.isna().sum()):
            msg = f"{name} has {n_na} missing labels; drop the spots without a label first."
            raise ValueError(msg)
    return t.astype(str).to_numpy(), p.astype(str).to_numpy()


def weighted_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """F1 score per class averaged with weights equal to each class's number of true spots.

    Classes that are predicted but absent from ``y_true`` get weight 0; a class never predicted
    has F1 = 0 (no warning). Labels are compared as strings.

    Parameters
    ----------
    y_true
        True labels (no missing values).
    y_pred
        Predicted labels, same length.

    Returns
    -------
    Weighted F1 in ``[0, 1]``.

    Examples
    --------
    >>> import stimg as si
    >>> si.metrics.weighted_f1(["a", "a", "b", "b"], ["a", "a", "b", "a"])
    0.7333333333333334
    """
    from sklearn.metrics import f1_score

    t, p = _labels(y_true, y_pred)
    return float(f1_score(t, p, average="weighted", zero_division=0))


def misclassified(y_true: Sequence, y_pred: Sequence) -> float:
    """Percentage of spots whose predicted label differs from the true one.

    Parameters
    ----------
    y_true
        True labels (no missing values).
    y_pred
        Predicted labels, same length.

    Returns
    -------
    Percentage in ``[0, 100]``.

    Examples
    --------
    >>> import stimg as si
    >>> si.metrics.misclassified(["a", "a", "b", "b"], ["a", "a", "b", "a"])
    25.0
    """
    t, p = _labels(y_true, y_pred)
    return float(100.0 * np.mean(t != p))
