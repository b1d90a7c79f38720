"""Spatial context and multi-scale patches on HER2ST: ridge and NB ensemble, C LOSO and C→A1 (issue 15).

Protocol: benchmarks/_protocol.py (full-resolution C2–C6, A1 from its 3.2 µm/px image; EfficientNet-Lite0
features, 112 µm → 224 px; top-50 HVGs chosen on each fold's training sections; mean PCC over genes per
test slide on log1p counts). Context features are computed per section with ``si.pp.spatial_context``
(test sections' *image features* are pooled within the test section only; no expression crosses folds).

Settings (``.obsm`` features fed to both models):

* ``none``: the 112 µm patch features.
* ``mean r``: ``method='mean'``: the mean of the features within r µm (the spot included), *in place*
  of the spot's own features.
* ``concat r`` (``spatial_context``'s default method, default r = 500): the spot's own features and
  the mean of its neighbours' within r µm.
* ``patches 112+336``: ``si.pp.embed`` at ``patch_um=336`` into a second key, joined with
  ``si.pp.combine_features`` (TRIPLEX's local + global views).
* ``patches 112+336 + concat 500``: ``concat 500`` of the 112 µm features joined with the 336 µm ones.
* ``CV-chosen``: ``si.tl.choose_spatial_context`` with its defaults (concat; 0, 250, 500, 750 µm),
  cross-validated on the fold's training sections only (leave-one-section-out ridge scorer).

Models: ``si.models.RidgeRegressor()`` (defaults: PCA 256, alpha by section-grouped CV) and
``si.models.NBEnsemble`` (defaults: 5 members, ``NBRegressor`` defaults, CPU). On C→A1 the NB ensemble is
repeated with ``--repeats`` seed sets (members ``5k … 5k+4``) for a mean ± sd; ridge is deterministic.
Single thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``).

Run:  STIMG_DATA_DIR=/work/shared/data STIMG_BENCH_CACHE=/work/cache/bench_embed OMP_NUM_THREADS=1 \\
      python benchmarks/bench_context_her2st.py [--settings none,0+500] [--repeats 3]
Writes benchmarks/results/bench_context_her2st.json (per fold and seed) and .md (the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _protocol import DEFAULT_CACHE, EMBED_KEY, FOLDS, fold_data, load, score, summarize  # noqa: E402

import stimg as si  # noqa: E402

SETTINGS = ["none", "mean 250", "mean 500", "concat 250", "concat 500", "concat 750", "patches 112+336",
            "patches 112+336 + concat 500", "CV-chosen"]


def features(adata, setting: str, fold, genes) -> tuple[str, dict]:
    """``.obsm`` key of a setting (computed once per table; CV-chosen once per fold)."""
    if setting == "none":
        return EMBED_KEY, {}
    key = f"X_{setting}"
    if setting == "CV-chosen":
        key = f"X_cv_{fold.name}"
        train = adata.obs["library_id"].isin(fold.train).to_numpy()
        res = si.tl.choose_spatial_context(adata, EMBED_KEY, train_indices=train, genes=genes, key_added=key)
        return key, {"chosen": res.loc[res.chosen, "context"].iloc[0],
                     "cv": dict(zip(res["context"], res["mean_pcc"].round(4), strict=True))}
    if key in adata.obsm:
        return key, {}
    if setting.split()[0] in ("mean", "concat"):
        method, radius = setting.split()
        si.pp.spatial_context(adata, EMBED_KEY, radius_um=float(radius), method=method, key_added=key)
    elif setting == "patches 112+336":
        si.pp.combine_features(adata, [EMBED_KEY, "X_patch336"], key_added=key)
    elif setting == "patches 112+336 + concat 500":
        si.pp.spatial_context(adata, EMBED_KEY, radius_um=500.0, key_added="X_concat500_for_patches")
        si.pp.combine_features(adata, ["X_concat500_for_patches", "X_patch336"], key_added=key)
    else:
        msg = f"unknown setting {setting!r}; known: {SETTINGS}"
        raise ValueError(msg)
    return key, {}


def ridge(adata, key, d) -> np.ndarray:
    train = np.zeros(adata.n_obs, bool)
    train[d.train] = True
    model = si.models.RidgeRegressor().fit(adata, key, genes=d.genes, train_indices=train, library_key="library_id")
    return model.predict(adata[d.test]).mean


def nb_ensemble(adata, key, d, seeds) -> tuple[np.ndarray, list[int]]:
    ad_tr, ad_te = adata[d.train].copy(), adata[d.test].copy()
    si.models.NBRegressor.setup_anndata(ad_tr, embedding_key=key, genes=d.genes)
    ens = si.models.NBEnsemble(ad_tr, seeds=seeds)
    ens.train(accelerator="cpu")
    pred = ens.predict(ad_te)
    cols = [list(pred.var_names).index(g) for g in d.genes]
    return np.asarray(pred.mean)[:, cols], [len(m.history["elbo_train"]) for m in ens.members]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--models", default="ridge,nb")
    ap.add_argument("--folds", default="all", help="comma-separated fold names, or 'all'")
    ap.add_argument("--repeats", type=int, default=3, help="NB seed sets on the cross-patient fold")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_context_her2st.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    si.settings.progress = False
    si.settings.verbosity = 0
    t0 = time.perf_counter()
    table, sdata = load(return_sdata=True)
    si.pp.embed(sdata, "efficientnet_lite0", patch_um=336.0, key_added="X_patch336", cache_dir=DEFAULT_CACHE,
                accelerator="cpu", progress=False)
    adata = table
    adata.obs["library_id"] = adata.obs["library_id"].astype(str)
    folds = FOLDS if args.folds == "all" else [f for f in FOLDS if f.name in args.folds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["setting"], r["model"], r["fold"], r["seed_set"]) for r in rows}
    for setting in args.settings.split(","):
        for fold in folds:
            d0 = fold_data(adata, fold)
            key, info = features(adata, setting, fold, d0.genes)
            d = fold_data(adata, fold, embedding_key=key)
            for model in args.models.split(","):
                repeats = args.repeats if (model == "nb" and fold.kind == "cross-patient") else 1
                for k in range(repeats):
                    if (setting, model, fold.name, k) in done:
                        continue
                    t = time.perf_counter()
                    extra = {}
                    if model == "ridge":
                        pred = ridge(adata, key, d)
                    else:
                        pred, epochs = nb_ensemble(adata, key, d, list(range(args.members * k, args.members * (k + 1))))
                        extra["epochs"] = epochs
                    rec = {"setting": setting, "model": model, "fold": fold.name, "kind": fold.kind, "seed_set": k,
                           "dim": int(d.x_train.shape[1]), **score(d, pred), **info, **extra,
                           "seconds": round(time.perf_counter() - t, 1)}
                    rows.append(rec)
                    print(json.dumps(rec), flush=True)
                    out.write_text(json.dumps({"protocol": __doc__.split("Run:")[0].strip(), "rows": rows}, indent=1))
    df = pd.DataFrame(rows)
    # C LOSO: mean ± sd over the 5 folds; C→A1: mean ± sd over NB seed sets (ridge: one run)
    table_md = []
    for kind, name in (("within-patient", "C LOSO"), ("cross-patient", "C→A1")):
        sub = df[df.kind == kind]
        if len(sub):
            s = summarize(sub, ["setting", "model"], metrics=("pcc",)).unstack("model")
            s.columns = [f"{name} {m}" for m in s.columns.get_level_values(-1)]
            table_md.append(s)
    md = pd.concat(table_md, axis=1).reindex([s for s in SETTINGS if s in set(df.setting)])
    text = md.to_markdown() if hasattr(md, "to_markdown") else md.to_string()
    out.with_suffix(".md").write_text("Mean PCC (top-50 HVG), mean ± sd. " + __doc__.split("\n")[0] + "\n\n" + text + "\n")
    print(text)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
