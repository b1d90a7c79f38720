"""Ridge on EfficientNet-Lite0 features, leave-one-section-out over HER2ST C2–C6: stimg vs plain sklearn.

Protocol (both paths): features = si.pp.embed(efficientnet_lite0, 112 µm → 224 px) of every spot;
per fold, genes = top-50 highly variable genes (scanpy seurat_v3, batch = section, genes detected
in ≥ 10 % of training spots) chosen on the four training sections only; target = log1p counts;
model = StandardScaler → PCA(256, full SVD) → Ridge, alpha from a log-grid by leave-one-section-out
CV within the training sections (scaler and PCA refitted in every inner fold, MSE); metric = mean
over genes of the PCC across the held-out section's spots (constant genes excluded).

* stimg path: si.pp.select_genes(method="hvg") → si.models.RidgeRegressor → si.tl.predict_expression
  → si.tl.evaluate.
* independent path: written here with numpy, scanpy's HVG and sklearn's GridSearchCV(Pipeline,
  LeaveOneGroupOut) only, on the same feature matrix (same patches).

Run:  STIMG_DATA_DIR=/work/shared/data python benchmarks/ridge_loso_her2st.py [--cache-dir /tmp/stimg_feats]
Writes benchmarks/results/ridge_loso_her2st.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
ALPHAS = np.logspace(-2, 6, 17)


def independent_fold(X, counts, var_names, sec, test, n_genes=50):
    """Plain numpy/scanpy/sklearn reimplementation of one fold; returns (genes, mean PCC, per-gene PCC)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = sec != test, sec == test
    C_tr = counts[tr]
    detected = (C_tr > 0).mean(0) >= 0.1
    sub = ad.AnnData(sp.csr_matrix(C_tr[:, detected]), obs=pd.DataFrame({"b": sec[tr]}))
    hv = sc.pp.highly_variable_genes(sub, n_top_genes=n_genes, flavor="seurat_v3", batch_key="b", inplace=False,
                                     span=0.5)
    ranks = np.full(counts.shape[1], np.inf)
    ranks[detected] = np.nan_to_num(hv["highly_variable_rank"].to_numpy(), nan=np.inf)
    genes_idx = np.argsort(ranks, kind="stable")[:n_genes]
    Y = np.log1p(counts[:, genes_idx])
    k = min(256, X.shape[1], min(int((tr & (sec != g)).sum()) for g in np.unique(sec[tr])))
    import tempfile

    from joblib import Memory

    # Pipeline(memory=) caches the scaler/PCA fit of each inner fold across the alpha grid (same result, faster)
    mem = Memory(tempfile.mkdtemp(prefix="ridge_loso_"), verbose=0)
    pipe = Pipeline([("s", StandardScaler()), ("p", PCA(n_components=k, svd_solver="full")), ("r", Ridge())],
                    memory=mem)
    gs = GridSearchCV(pipe, {"r__alpha": ALPHAS}, cv=LeaveOneGroupOut(), scoring="neg_mean_squared_error")
    gs.fit(X[tr], Y[tr], groups=sec[tr])
    P = gs.predict(X[te])
    T = Y[te]
    pcc = []
    for j in range(T.shape[1]):
        a, b = T[:, j], P[:, j]
        pcc.append(np.nan if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1]))
    pcc = np.array(pcc)
    return [var_names[i] for i in genes_idx], float(np.nanmean(pcc)), float(gs.best_params_["r__alpha"]), pcc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default="/tmp/stimg_feats")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ridge_loso_her2st.json"))
    args = ap.parse_args()

    import scipy.sparse as sp

    import stimg as si

    t0 = time.perf_counter()
    sdata = si.datasets.her2st(SECTIONS)
    table = sdata.tables["table"]
    si.pp.embed(sdata, "efficientnet_lite0", patch_um=112, cache_dir=args.cache_dir)
    t_embed = time.perf_counter() - t0
    X = np.asarray(table.obsm["X_efficientnet_lite0"], dtype=np.float64)
    counts = table.X.toarray() if sp.issparse(table.X) else np.asarray(table.X)
    sec = table.obs["library_id"].astype(str).to_numpy()
    var_names = list(table.var_names)

    folds = []
    for test in SECTIONS:
        train_secs = [s for s in SECTIONS if s != test]
        # --- stimg path
        ad_ = table.copy()
        si.pp.select_genes(ad_, 50, method="hvg", subset=train_secs)
        model = si.models.RidgeRegressor().fit(ad_, "X_efficientnet_lite0", train_indices=ad_.obs["library_id"].isin(train_secs).to_numpy())
        si.tl.predict_expression(ad_, model)
        res = si.tl.evaluate(ad_, mask=(ad_.obs["library_id"] == test).to_numpy())
        stimg_pcc = float(res.query("group == @test and metric == 'pcc'")["value"].iloc[0])
        stimg_genes = list(model.var_names_)
        # --- independent path
        ind_genes, ind_pcc, ind_alpha, _ = independent_fold(X, counts, var_names, sec, test)
        folds.append({"test": test, "n_test_spots": int((sec == test).sum()),
                      "stimg_mean_pcc": stimg_pcc, "independent_mean_pcc": ind_pcc,
                      "abs_diff": abs(stimg_pcc - ind_pcc), "stimg_alpha": model.alpha_, "independent_alpha": ind_alpha,
                      "same_genes": sorted(stimg_genes) == sorted(ind_genes),
                      "stimg_mse": float(res.query("group == @test and metric == 'mse'")["value"].iloc[0]),
                      "stimg_mae": float(res.query("group == @test and metric == 'mae'")["value"].iloc[0])})
        print(json.dumps(folds[-1]))
    out = {"protocol": __doc__.split("Run:")[0].strip(), "encoder": "efficientnet_lite0", "patch_um": 112,
           "n_genes": 50, "alphas": ALPHAS.tolist(), "folds": folds,
           "mean_over_folds": {"stimg": float(np.mean([f["stimg_mean_pcc"] for f in folds])),
                               "independent": float(np.mean([f["independent_mean_pcc"] for f in folds]))},
           "embed_s": t_embed, "total_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["mean_over_folds"]))


if __name__ == "__main__":
    main()
