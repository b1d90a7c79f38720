"""The demo's C6 numbers with and without spatial context (issue 15: context in the demo only if it wins).

Same steps and settings as ``stimg demo`` (train C2–C5 → test C6, tissue QC ≥ 50 %, EfficientNet-Lite0
112 µm features, 50 HVGs chosen on the training sections, ridge, 3-member NB ensemble calibrated by
leaving each training section out), once on the spot's own features and once per ``--context-um``
radius with ``si.pp.spatial_context(method='concat')`` (own features + neighbours' mean). The images
are dropped after embedding, so this needs far less memory than the demo.

Run:  OMP_NUM_THREADS=1 STIMG_DATA_DIR=... python benchmarks/demo_context_her2st.py --cache-dir demo_out/feature_cache
Writes benchmarks/results/demo_context_her2st.csv.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import pandas as pd

import stimg as si
from stimg._utils import torch_threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--context-um", type=float, nargs="+", default=[0.0, 500.0])
    ap.add_argument("--out", default="benchmarks/results/demo_context_her2st.csv")
    a = ap.parse_args()
    si.settings.progress = False
    si.settings.verbosity = 1
    train, test = ["C2", "C3", "C4", "C5"], "C6"
    sdata = si.datasets.her2st([*train, test])
    si.pp.tissue_coverage(sdata, size_um=112.0, min_coverage=0.5)
    si.pp.embed(sdata, "efficientnet_lite0", patch_um=112.0, cache_dir=a.cache_dir, progress=False)
    table = sdata.tables["table"]
    for k in list(sdata.images):  # only the features are needed from here on
        del sdata.images[k]
    gc.collect()
    lib = table.obs["library_id"].astype(str)
    train_mask, test_mask = lib.isin(train).to_numpy(), (lib == test).to_numpy()
    si.pp.select_genes(table, 50, method="hvg", subset=train)
    genes = list(table.var_names[table.var["si_target"].to_numpy(bool)])
    cols = table.var_names.get_indexer(genes)
    counts = table.X[test_mask][:, cols]
    counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float64)
    rows = []
    with torch_threads(0):
        for r in a.context_um:
            key = "X_efficientnet_lite0"
            if r > 0:
                si.pp.spatial_context(table, key, radius_um=r, method="concat", key_added=f"X_ctx{r:g}", n_jobs=1)
                key = f"X_ctx{r:g}"
            t0 = time.perf_counter()
            ridge = si.models.RidgeRegressor().fit(table, key, train_indices=train_mask)
            si.tl.predict_expression(table, ridge, key_added="si_pred_ridge")
            ev_r = si.tl.evaluate(table, pred_layer="si_pred_ridge", genes=genes, mask=test_mask, inplace=False)
            t1 = time.perf_counter()
            si.models.NBRegressor.setup_anndata(table, embedding_key=key)
            ens = si.models.NBEnsemble(table, n_members=3)
            ens.train(train_indices=train_mask, progress=False)
            t2 = time.perf_counter()
            ens.calibrate("library_id", progress=False)
            t3 = time.perf_counter()
            si.tl.predict_expression(table, ens, key_added="si_pred_nb")
            ev_n = si.tl.evaluate(table, pred_layer="si_pred_nb", genes=genes, mask=test_mask, inplace=False)
            base = {"context_um": r, "dim": table.obsm[key].shape[1]}
            for model, ev in (("ridge", ev_r), ("NB ensemble", ev_n)):
                for m in ("pcc", "pcc_pooled", "mse", "mae"):
                    sel = (ev["group"] == ("all" if m == "pcc_pooled" else test)) & (ev["metric"] == m)
                    v = float(ev.loc[sel, "value"].iloc[0])
                    rows.append({**base, "model": model, "metric": m, "value": v})
            test_ad = table[test_mask]
            for cal in (False, True):
                lo, hi = ens.predict_interval(test_ad, level=0.9, calibrated=cal)
                cov = float(((counts >= lo) & (counts <= hi)).mean())
                rows.append({**base, "model": "NB ensemble", "metric": f"coverage_90_{'cal' if cal else 'uncal'}",
                             "value": cov})
            rows += [{**base, "model": "ridge", "metric": "fit_s", "value": t1 - t0},
                     {**base, "model": "NB ensemble", "metric": "train_s", "value": t2 - t1},
                     {**base, "model": "NB ensemble", "metric": "calibrate_s", "value": t3 - t2}]
            print(pd.DataFrame(rows[-13:]).to_string(index=False), flush=True)
    df = pd.DataFrame(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    print(df.pivot_table(index=["model", "metric"], columns="context_um", values="value").round(3).to_string())


if __name__ == "__main__":
    main()
