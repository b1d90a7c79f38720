"""HER2ST leave-one-section-out (C2–C6): NB ensemble vs ridge on frozen EfficientNet-Lite0 features.

Run:  python benchmarks/eval_nb_her2st.py  [--members 5] [--out benchmarks/results/nb_her2st_loso.json]
Needs the shared data (STIMG_DATA_DIR or --datadir). Features come from si.pp.embed and are cached
in --cache (default /tmp/stimg_embed_cache). Top-50 HVGs are chosen on the training sections only.
Ridge baselines on log1p counts of the same genes and features: ``ridge`` = sklearn StandardScaler →
PCA(256 or fewer) → RidgeCV (efficient leave-one-spot-out alpha), and ``si_ridge`` = si.models.RidgeRegressor
(HEST style, alpha chosen by section-grouped CV on the training sections).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import stimg as si

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def ridge_predict(x_tr, y_tr, x_te, seed=0):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_comp = min(256, x_tr.shape[0] - 1, x_tr.shape[1])
    pipe = make_pipeline(StandardScaler(), PCA(n_comp, random_state=seed), RidgeCV(alphas=np.logspace(-1, 5, 13)))
    pipe.fit(x_tr, y_tr)
    return pipe.predict(x_te)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datadir", default=None)
    ap.add_argument("--cache", default="/tmp/stimg_embed_cache")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--n-genes", type=int, default=50)
    ap.add_argument("--max-epochs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/nb_her2st_loso.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.datadir:
        si.settings.datadir = a.datadir
    si.settings.progress = False
    si.settings.verbosity = 1
    adata = si.datasets.her2st(SECTIONS, as_anndata=True)
    si.pp.embed(adata, "efficientnet_lite0", cache_dir=a.cache, accelerator="cpu")
    key = "X_efficientnet_lite0"
    lib = adata.obs["library_id"].astype(str).to_numpy()
    folds, per_gene_rows = [], []
    for test in SECTIONS:
        t0 = time.perf_counter()
        tr_mask, te_mask = lib != test, lib == test
        genes = list(si.pp.select_genes(adata, a.n_genes, method="hvg", subset=[s for s in SECTIONS if s != test],
                                        inplace=False))
        ad_tr, ad_te = adata[tr_mask].copy(), adata[te_mask].copy()
        cols = adata.var_names.get_indexer(genes)
        counts_te = np.asarray(ad_te.X[:, cols].todense() if hasattr(ad_te.X, "todense") else ad_te.X[:, cols], dtype=np.float64)
        counts_tr = np.asarray(ad_tr.X[:, cols].todense() if hasattr(ad_tr.X, "todense") else ad_tr.X[:, cols], dtype=np.float64)
        y_te = np.log1p(counts_te)
        # ridge baseline
        yr = ridge_predict(ad_tr.obsm[key], np.log1p(counts_tr), ad_te.obsm[key])
        # the library's ridge baseline (section-grouped alpha CV)
        ridge = si.models.RidgeRegressor().fit(ad_tr, key, genes=genes, library_key="library_id")
        ys = np.asarray(ridge.predict(ad_te).mean)[:, [list(ridge.predict(ad_te).var_names).index(g) for g in genes]]
        # NB ensemble
        si.models.NBRegressor.setup_anndata(ad_tr, embedding_key=key, genes=genes)
        ens = si.models.NBEnsemble(ad_tr, n_members=a.members)
        t1 = time.perf_counter()
        ens.train(max_epochs=a.max_epochs, accelerator="cpu")
        t_train = time.perf_counter() - t1
        pred = ens.predict(ad_te)
        members = ens.member_predictions(ad_te)
        lo, hi = ens.predict_interval(ad_te, level=0.9)
        p_nb = si.metrics.pearson(y_te, pred.mean, var_names=genes)
        p_r = si.metrics.pearson(y_te, yr, var_names=genes)
        member_pcc = [si.metrics.pearson(y_te, m.mean).mean for m in members]
        cal_epi = si.metrics.uncertainty_calibration(y_te, pred.mean, pred.epistemic, lower=lo, upper=hi,
                                                     observed=counts_te)
        cal_ale = si.metrics.uncertainty_calibration(y_te, pred.mean, pred.aleatoric)
        fold = {
            "test": test, "n_train": int(tr_mask.sum()), "n_test": int(te_mask.sum()),
            "pcc_nb_ensemble": p_nb.mean, "pcc_ridge": p_r.mean,
            "mse_nb_ensemble": si.metrics.mse(y_te, pred.mean), "mse_ridge": si.metrics.mse(y_te, yr),
            "pcc_si_ridge": si.metrics.pearson(y_te, ys).mean, "mse_si_ridge": si.metrics.mse(y_te, ys),
            "pcc_members": member_pcc, "pcc_member_median": float(np.median(member_pcc)),
            "spearman_epistemic_abs_error": cal_epi.spearman, "spearman_aleatoric_abs_error": cal_ale.spearman,
            "coverage_90": cal_epi.coverage, "n_constant_genes": int(p_nb.n_constant.iloc[0]),
            "epochs": [len(m.history["elbo_train"]) for m in ens.members],
            "train_seconds": t_train, "fold_seconds": time.perf_counter() - t0,
        }
        folds.append(fold)
        per_gene_rows.append(pd.DataFrame({"test": test, "gene": genes, "pcc_nb": p_nb.per_gene.iloc[:, 0].to_numpy(),
                                           "pcc_ridge": p_r.per_gene.iloc[:, 0].to_numpy()}))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fold.items() if k != "pcc_members"}, flush=True)
    df = pd.DataFrame(folds)
    mean = df[[c for c in df.columns if c.startswith(("pcc_", "mse_", "spearman_", "coverage"))
               and c != "pcc_members"]].mean()
    print(df[["test", "pcc_nb_ensemble", "pcc_ridge", "pcc_si_ridge", "mse_nb_ensemble", "mse_ridge", "mse_si_ridge",
              "pcc_member_median",
              "spearman_epistemic_abs_error", "coverage_90"]].round(4).to_string(index=False))
    print("mean\n" + mean.round(4).to_string())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "folds": folds, "mean": mean.to_dict(),
                               "torch_threads": torch.get_num_threads()}, indent=2))
    pd.concat(per_gene_rows).to_csv(out.with_suffix(".per_gene.csv"), index=False)


if __name__ == "__main__":
    main()
