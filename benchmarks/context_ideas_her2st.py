"""Ridge-only cheap ideas for C→A1 (issue 15 exploration): per-section centred / z-scored features, context.

Run: STIMG_DATA_DIR=... STIMG_BENCH_CACHE=/work/cache/bench_embed OMP_NUM_THREADS=1 python benchmarks/context_ideas_her2st.py
Results quoted in benchmarks/results/context_her2st.md.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import torch
from _protocol import DEFAULT_CACHE, EMBED_KEY, FOLDS, fold_data, load, score  # noqa: E402

import stimg as si  # noqa: E402

torch.set_num_threads(1)
si.settings.progress = False
si.settings.verbosity = 0
table, sdata = load(return_sdata=True)
si.pp.embed(sdata, "efficientnet_lite0", patch_um=336.0, key_added="X_patch336", cache_dir=DEFAULT_CACHE, accelerator="cpu", progress=False)
ad = table
ad.obs["library_id"] = ad.obs["library_id"].astype(str)
lib = ad.obs["library_id"].to_numpy()

def center(key, scale=False):
    x = np.asarray(ad.obsm[key], np.float32).copy()
    for s in np.unique(lib):
        m = lib == s
        x[m] -= x[m].mean(0)
        if scale:
            x[m] /= x[m].std(0) + 1e-6
    return x

for k in [EMBED_KEY, "X_patch336"]:
    ad.obsm[k + "_c"] = center(k)
    ad.obsm[k + "_z"] = center(k, True)
for src in [EMBED_KEY, EMBED_KEY + "_c", EMBED_KEY + "_z"]:
    for r in (250, 500, 750):
        si.pp.spatial_context(ad, src, radius_um=r, key_added=f"{src}_concat{r}")
    si.pp.spatial_context(ad, src, radius_um=[250, 500, 750], key_added=f"{src}_concatms")
si.pp.combine_features(ad, [EMBED_KEY + "_c_concat500", "X_patch336_c"], key_added="c_patch_concat500")
si.pp.combine_features(ad, [EMBED_KEY + "_z_concat500", "X_patch336_z"], key_added="z_patch_concat500")
si.pp.combine_features(ad, [EMBED_KEY + "_concat500", "X_patch336"], key_added="patch_concat500")
keys = sys.argv[1].split(",") if len(sys.argv) > 1 else None
allkeys = [EMBED_KEY, EMBED_KEY + "_c", EMBED_KEY + "_z", EMBED_KEY + "_concat500", EMBED_KEY + "_c_concat500",
           EMBED_KEY + "_z_concat500", EMBED_KEY + "_c_concat250", EMBED_KEY + "_c_concat750", EMBED_KEY + "_c_concatms",
           EMBED_KEY + "_concatms", "patch_concat500", "c_patch_concat500", "z_patch_concat500"]
out = []
for key in keys or allkeys:
    for fold in FOLDS:
        d = fold_data(ad, fold, embedding_key=key)
        train = np.zeros(ad.n_obs, bool)
        train[d.train] = True
        m = si.models.RidgeRegressor().fit(ad, key, genes=d.genes, train_indices=train, library_key="library_id")
        sc = score(d, m.predict(ad[d.test]).mean)
        rec = {"key": key, "fold": fold.name, **sc}
        out.append(rec)
        print(json.dumps(rec), flush=True)
import pandas as pd  # noqa: E402

df = pd.DataFrame(out)
df["kind"] = np.where(df.fold == "C→A1", "A1", "LOSO")
print(df.groupby(["key", "kind"], sort=False).pcc.agg(["mean", "std"]).unstack().round(3).to_string())
