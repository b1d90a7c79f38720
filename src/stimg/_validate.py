"""Input validation: every public function checks before it writes anything."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def assert_key_in(container: Mapping | Iterable, key: Any, *, where: str, hint: str | None = None) -> None:
    """Raise a :class:`KeyError` listing the available keys when ``key`` is missing."""
    keys = list(container.keys()) if hasattr(container, "keys") else list(container)
    if key not in keys:
        shown = ", ".join(map(repr, keys[:30])) + (" …" if len(keys) > 30 else "")
        msg = f"{key!r} not found in {where}. Available: [{shown}]."
        if hint:
            msg += f" {hint}"
        raise KeyError(msg)


def check_matrix(x: Any, name: str, *, n_obs: int | None = None, n_cols: int | None = None,
                 finite: bool = True) -> np.ndarray:
    """Return ``x`` as a dense 2-D float array after checking shape and finiteness."""
    import scipy.sparse as sp

    arr = x.toarray() if sp.issparse(x) else np.asarray(x)
    if arr.ndim != 2 or (n_obs is not None and arr.shape[0] != n_obs) or (n_cols is not None and arr.shape[1] != n_cols):
        msg = f"{name} must have shape ({n_obs if n_obs is not None else 'n'}, {n_cols or 'd'}), got {arr.shape}."
        raise ValueError(msg)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        msg = f"{name} must be numeric, got dtype {arr.dtype}."
        raise TypeError(msg)
    if finite and (bad := int((~np.isfinite(arr)).sum())):
        msg = f"{name} has {bad} non-finite values (NaN/inf); drop or impute those spots first."
        raise ValueError(msg)
    return arr


def check_nonempty(n: int, what: str, hint: str = "") -> None:
    """Raise when a selection is empty."""
    if n == 0:
        msg = f"{what} is empty.{(' ' + hint) if hint else ''}"
        raise ValueError(msg)


def check_fraction(value: float, name: str, *, low: float = 0.0, high: float = 1.0) -> float:
    """Check ``low <= value <= high``."""
    v = float(value)
    if not np.isfinite(v) or not (low <= v <= high):
        msg = f"{name} must be in [{low}, {high}], got {value!r}."
        raise ValueError(msg)
    return v


def obs_mask(adata, mask, what: str = "mask") -> np.ndarray:
    """A boolean spot mask from ``None`` (all spots), an obs column name, or a boolean array."""
    if mask is None:
        return np.ones(adata.n_obs, bool)
    if isinstance(mask, str):
        assert_key_in(adata.obs, mask, where="adata.obs", hint=f"Pass {what} as a boolean obs column or array.")
        mask = adata.obs[mask].to_numpy()
    arr = np.asarray(mask)
    if arr.dtype != bool or arr.shape != (adata.n_obs,):
        msg = f"{what} must be a boolean array with one entry per spot ({adata.n_obs}), got {arr.dtype} {arr.shape}."
        raise ValueError(msg)
    return arr


def check_indices(indices, n: int, name: str = "train_indices") -> np.ndarray:
    """Integer positions from ``None`` (all ``n``), a boolean mask or integer indices, range-checked."""
    if indices is None:
        return np.arange(n)
    arr = np.asarray(indices)
    if arr.dtype == bool:
        if arr.shape != (n,):
            msg = f"Boolean {name} must have one entry per spot ({n}), got shape {arr.shape}."
            raise ValueError(msg)
        return np.flatnonzero(arr)
    arr = arr.astype(int)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        msg = f"{name} must lie in [0, {n}), got range [{arr.min()}, {arr.max()}]."
        raise ValueError(msg)
    return arr
