"""Patient-level train/validation/test splits with a leakage check (DESIGN §5)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import LIBRARY_KEY, TABLE_KEY
from .._docs import d
from .._logging import log_added
from .._spatial import get_table
from .._validate import assert_key_in, check_fraction


def check_split_leakage(data: Any, split_key: str = "si_split", *, keys: Sequence[str] = ("patient", LIBRARY_KEY),
                        table_key: str = TABLE_KEY) -> None:
    """Raise when a section or patient has spots in more than one split.

    Parameters
    ----------
    %(data)s
    split_key
        ``.obs`` column with the split of each spot.
    keys
        ``.obs`` columns whose groups must each fall in a single split (missing ones are skipped;
        at least one must exist).
    %(table_key)s

    Examples
    --------
    >>> import stimg as si
    >>> si.tl.check_split_leakage(adata, "si_split")  # doctest: +SKIP
    """
    table = get_table(data, table_key)
    assert_key_in(table.obs, split_key, where="table.obs", hint="Run si.tl.split_by_patient first.")
    present = [k for k in keys if k in table.obs]
    if not present:
        assert_key_in(table.obs, keys[0], where="table.obs")
    split = table.obs[split_key].astype(str)
    for k in present:
        n = split.groupby(table.obs[k].astype(str).to_numpy()).nunique()
        bad = n[n > 1]
        if len(bad):
            ex = {g: sorted(split[table.obs[k].astype(str) == g].unique()) for g in bad.index[:3]}
            msg = f"leakage: {len(bad)} values of obs[{k!r}] have spots in several splits: {ex}."
            raise ValueError(msg)


check_split_leakage.__doc__ = d.dedent(check_split_leakage).__doc__


@d.dedent
def split_by_patient(
    data: Any,
    *,
    test_patients: Sequence[str] | None = None,
    val_patients: Sequence[str] | None = None,
    test_size: float = 0.2,
    val_size: float = 0.0,
    patient_key: str = "patient",
    library_key: str = LIBRARY_KEY,
    seed: int = 0,
    table_key: str = TABLE_KEY,
    key_added: str = "si_split",
    inplace: bool = True,
) -> pd.Series | None:
    """Assign whole patients to ``'train'``/``'val'``/``'test'`` and check that nothing leaks.

    Every spot of a patient goes to one split, so no patient (and hence no section) crosses
    splits; :func:`check_split_leakage` verifies this for both ``patient_key`` and
    ``library_key`` before anything is written (a section holding spots of several patients
    raises). For leave-one-section-out within one patient pass ``patient_key=library_key``.

    Parameters
    ----------
    %(data)s
    test_patients, val_patients
        Patients to put in the test/validation split; ``None`` draws them at random.
    test_size, val_size
        Fraction of patients drawn at random for test/validation (at least one when > 0).
    patient_key
        ``.obs`` column naming each spot's patient (the grouping unit).
    library_key
        ``.obs`` column naming each spot's section (checked too, when present).
    seed
        Seed of the random draw.
    %(table_key)s
    key_added
        ``.obs`` column of the split.
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` the categorical split per spot; otherwise ``None`` and the table gets
    ``.obs[key_added]`` and ``.uns[key_added]`` (``params`` and the patients of each split).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(50, 5, n_sections=4, image=False, as_anndata=True)
    >>> si.tl.split_by_patient(adata, patient_key="library_id", test_patients=["S3"])
    >>> adata.obs["si_split"].value_counts().to_dict()
    {'train': 150, 'test': 50}
    """
    start = time.perf_counter()
    table = get_table(data, table_key)
    assert_key_in(table.obs, patient_key, where="table.obs", hint="Name the patient column with patient_key=.")
    pats = table.obs[patient_key].astype(str)
    uniq = list(pd.unique(pats))
    rng = np.random.default_rng(seed)

    def _given(name, values):
        vals = [str(v) for v in values]
        unknown = sorted(set(vals) - set(uniq))
        if unknown:
            msg = f"{name} {unknown} not found in obs[{patient_key!r}]. Available: {uniq}."
            raise KeyError(msg)
        return vals

    test = _given("test_patients", test_patients) if test_patients is not None else None
    val = _given("val_patients", val_patients) if val_patients is not None else None
    pool = [p for p in uniq if p not in (test or []) and p not in (val or [])]
    if test is None:
        check_fraction(test_size, "test_size")
        k = max(1, int(round(test_size * len(uniq)))) if test_size > 0 else 0
        test = list(rng.choice(pool, size=min(k, len(pool)), replace=False)) if k else []
        pool = [p for p in pool if p not in test]
    if val is None:
        check_fraction(val_size, "val_size")
        k = max(1, int(round(val_size * len(uniq)))) if val_size > 0 else 0
        val = list(rng.choice(pool, size=min(k, len(pool)), replace=False)) if k else []
        pool = [p for p in pool if p not in val]
    if set(test) & set(val):
        msg = f"patients {sorted(set(test) & set(val))} are in both test and validation."
        raise ValueError(msg)
    if not pool:
        msg = f"no patient is left for training ({len(uniq)} patients: test {test}, val {val})."
        raise ValueError(msg)
    split = np.where(pats.isin(test), "test", np.where(pats.isin(val), "val", "train"))
    cats = ["train", "val", "test"] if val else ["train", "test"]
    result = pd.Series(pd.Categorical(split, categories=cats), index=table.obs_names, name=key_added)
    # leakage check on a scratch frame: nothing is written if it fails
    scratch = pd.DataFrame({key_added: result, patient_key: pats})
    if library_key in table.obs and library_key != patient_key:
        scratch[library_key] = table.obs[library_key].astype(str)
    from anndata import AnnData

    check_split_leakage(AnnData(obs=scratch), key_added, keys=[k for k in (patient_key, library_key) if k in scratch])
    if not inplace:
        return result
    table.obs[key_added] = result
    table.uns[key_added] = {"params": {"patient_key": patient_key, "library_key": library_key, "seed": seed,
                                       "test_size": test_size, "val_size": val_size},
                            "train": [str(p) for p in pool], "val": [str(p) for p in val],
                            "test": [str(p) for p in test]}
    log_added("obs", key_added, start)
    return None
