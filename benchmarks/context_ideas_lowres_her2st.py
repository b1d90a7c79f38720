"""Ridge, issue 15 exploration: the protocol on the AnnData form (every section at ≈ 3.4 µm/px, as A1).

Run: STIMG_DATA_DIR=... STIMG_BENCH_CACHE=/work/cache/bench_embed OMP_NUM_THREADS=1 python benchmarks/context_ideas_lowres_her2st.py
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
ad = load(full_res=False)
print(ad.uns[EMBED_KEY]["params"].get("n_from_cache"), ad.uns[EMBED_KEY]["params"].get("n_computed"), flush=True)
si.pp.embed(ad, "efficientnet_lite0", patch_um=336.0, key_added="X_patch336", cache_dir=DEFAULT_CACHE, accelerator="cpu", progress=False)
print(ad.uns["X_patch336"]["params"].get("n_from_cache"), ad.uns["X_patch336"]["params"].get("n_computed"), flush=True)
si.settings.verbosity = 0
ad.obs["library_id"] = ad.obs["library_id"].astype(str)
for r in (250, 500, 750):
    si.pp.spatial_context(ad, EMBED_KEY, radius_um=r, key_added=f"concat{r}")
si.pp.combine_features(ad, ["concat500", "X_patch336"], key_added="patch_concat500")
si.pp.combine_features(ad, [EMBED_KEY, "X_patch336"], key_added="patch")
for key in [EMBED_KEY, "concat250", "concat500", "concat750", "patch", "patch_concat500"]:
    for fold in FOLDS:
        d = fold_data(ad, fold, embedding_key=key)
        train = np.zeros(ad.n_obs, bool)
        train[d.train] = True
        m = si.models.RidgeRegressor().fit(ad, key, genes=d.genes, train_indices=train, library_key="library_id")
        print(json.dumps({"key": key, "fold": fold.name, **score(d, m.predict(ad[d.test]).mean)}), flush=True)
