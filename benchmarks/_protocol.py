"""One evaluation protocol for every HER2ST benchmark (DESIGN §5), so numbers are comparable.

Folds
    ``C LOSO``: train on four of C2–C6, test on the fifth (5 folds, one patient).
    ``C→A1``: train on C2–C6, test on A1 (another patient) — the honest cross-patient fold.
Data
    ``load(full_res=True)`` (default): the SpatialData form of :func:`stimg.datasets.her2st`, whose table
    is returned — C2–C6 embedded from the full-resolution H&E (≈ 0.7 µm/px), A1 from its only image
    (3.2 µm/px). ``full_res=False``: the AnnData form (images ≤ 2000 px, ≈ 3.4 µm/px for every section,
    so both patients are embedded at the same resolution).
Features
    :func:`stimg.pp.embed` with the offline ``efficientnet_lite0`` (112 µm → 224 px), cached on disk.
Genes
    Top-``n`` HVGs (``si.pp.select_genes(method='hvg')``) chosen on the fold's training sections only.
Scores
    :func:`stimg.metrics.pearson` (mean over slides of the mean PCC over non-constant genes, on log1p
    counts), :func:`stimg.metrics.mse`, :func:`stimg.metrics.mae`.

Use::

    from _protocol import FOLDS, load, fold_data, score
    adata = load()
    for fold in FOLDS:
        d = fold_data(adata, fold, n_genes=50)
        pred = model_fit_predict(d.x_train, d.y_train, d.x_test)   # log1p scale
        print(fold.name, score(d, pred))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import stimg as si

C_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
CROSS_PATIENT = "A1"
EMBED_KEY = "X_efficientnet_lite0"
DEFAULT_CACHE = Path(os.environ.get("STIMG_BENCH_CACHE", Path("~/.cache/stimg/bench_embed").expanduser()))


@dataclass(frozen=True)
class Fold:
    """A train/test split of sections."""

    name: str
    train: tuple[str, ...]
    test: str
    kind: str  # "within-patient" or "cross-patient"


FOLDS: list[Fold] = [
    *(Fold(f"C LOSO {s}", tuple(x for x in C_SECTIONS if x != s), s, "within-patient") for s in C_SECTIONS),
    Fold("C→A1", tuple(C_SECTIONS), CROSS_PATIENT, "cross-patient"),
]


def load(sections: list[str] | None = None, *, full_res: bool = True, encoder: str = "efficientnet_lite0",
         cache_dir: str | os.PathLike | None = DEFAULT_CACHE, datadir: str | None = None, return_sdata: bool = False):
    """C2–C6 and A1 as one AnnData (counts, labels, ``obsm['deconv_major']``, image features in ``obsm``).

    With ``return_sdata`` (needs ``full_res``) the SpatialData is returned too: ``(table, sdata)``.
    """
    if datadir:
        si.settings.datadir = datadir
    sections = sections or [*C_SECTIONS, CROSS_PATIENT]
    if not full_res:
        adata = si.datasets.her2st(sections, as_anndata=True)
        si.pp.embed(adata, encoder, cache_dir=cache_dir, accelerator="cpu", progress=False)
        return adata
    sdata = si.datasets.her2st(sections)
    si.pp.embed(sdata, encoder, cache_dir=cache_dir, accelerator="cpu", progress=False)
    table = sdata.tables["table"]
    return (table, sdata) if return_sdata else table


@dataclass
class FoldData:
    """Arrays of one fold (rows in table order within train and test)."""

    fold: Fold
    genes: list[str]
    train: np.ndarray  # row positions
    test: np.ndarray
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray  # log1p counts of the target genes
    y_test: np.ndarray
    counts_train: np.ndarray  # raw counts of the target genes
    counts_test: np.ndarray
    groups_test: np.ndarray


def fold_data(adata, fold: Fold, *, n_genes: int = 50, method: str = "hvg", embedding_key: str = EMBED_KEY) -> FoldData:
    """Split ``adata`` by ``fold``; genes chosen on the training sections only."""
    lib = adata.obs["library_id"].astype(str).to_numpy()
    train = np.flatnonzero(np.isin(lib, fold.train))
    test = np.flatnonzero(lib == fold.test)
    genes = list(si.pp.select_genes(adata, n_genes, method=method, subset=list(fold.train), inplace=False))
    idx = adata.var_names.get_indexer(genes)
    X = adata.X
    counts = np.asarray(X[:, idx].toarray() if hasattr(X, "toarray") else X[:, idx], dtype=np.float64)
    emb = np.asarray(adata.obsm[embedding_key], dtype=np.float32)
    return FoldData(fold, genes, train, test, emb[train], emb[test], np.log1p(counts[train]), np.log1p(counts[test]),
                    counts[train], counts[test], lib[test])


def score(d: FoldData, pred_log1p: np.ndarray) -> dict[str, float]:
    """PCC (mean over genes, per test slide), pooled PCC, MSE and MAE on log1p counts."""
    pred = np.asarray(pred_log1p, dtype=np.float64)
    r = si.metrics.pearson(d.y_test, pred, groups=d.groups_test, var_names=d.genes)
    return {"pcc": float(r.mean), "pooled_pcc": float(r.pooled), "mse": float(si.metrics.mse(d.y_test, pred)),
            "mae": float(si.metrics.mae(d.y_test, pred)), "n_constant": int(r.n_constant.sum())}


def summarize(df: pd.DataFrame, by: list[str], metrics: tuple[str, ...] = ("pcc", "mse", "mae")) -> pd.DataFrame:
    """``mean ± sd`` per group over rows (folds and/or seeds), as strings for a note's table."""
    g = df.groupby(by, sort=False)[list(metrics)]
    m, s = g.mean(), g.std(ddof=1).fillna(0.0)
    return m.round(3).astype(str) + " ± " + s.round(3).astype(str)
