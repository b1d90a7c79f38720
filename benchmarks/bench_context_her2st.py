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
      python benchmarks/bench_context_her2st.py [--settings "none,concat 500"] [--repeats 3] [--out PATH.json]
Writes PATH.json (per fold and seed; default benchmarks/results/context_her2st.json), PATH.csv (the same rows)
and PATH.md (the table: PCC and MSE, mean ± sd). Runs split over processes (``--settings``, ``--out``) are
joined with ``--merge a.json,b.json`` (no training; writes the ``--out`` files).
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

SETTINGS = ["none", "mean 250", "mean 500", "mean 750", "concat 250", "concat 500", "concat 750", "patches 112+336",
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


def write_tables(rows: list[dict], out: Path) -> None:
    """``out``.csv (every row) and ``out``.md (PCC and MSE: C LOSO mean ± sd over the 5 folds; C→A1 over NB seed sets)."""
    df = pd.DataFrame(rows)
    df.to_csv(out.with_suffix(".csv"), index=False)
    parts = []
    for kind, name in (("within-patient", "C LOSO"), ("cross-patient", "C→A1")):
        sub = df[df.kind == kind]
        if len(sub):
            s = summarize(sub, ["setting", "model"], metrics=("pcc", "mse"))
            n = sub.groupby(["setting", "model"], sort=False).size()
            if kind == "within-patient":  # flag cells with fewer than the 5 folds
                s = s.apply(lambda col, n=n: col + np.where(n[col.index] < 5, [f" ({k}/5)" for k in n[col.index]], ""))
            s = s.unstack("model")
            s.columns = [f"{name} {m} {metric.upper()}" for metric, m in s.columns]
            parts.append(s)
    md = pd.concat(parts, axis=1)
    order = ["ridge", "nb"]
    cols = [c for name in ("C LOSO", "C→A1") for metric in ("PCC", "MSE") for m in order
            if (c := f"{name} {m} {metric}") in md.columns]
    md = md[cols].reindex([s for s in SETTINGS if s in set(df.setting)])
    text = md.to_markdown() if hasattr(md, "to_markdown") else md.to_string()
    out.with_suffix(".md").write_text(__doc__.split("\n")[0] + "\n\nMean PCC (top-50 HVG) and MSE (log1p), mean ± sd; "
                                      "(k/5): only k of the 5 C LOSO folds were run.\n\n"
                                      + text + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--models", default="ridge,nb")
    ap.add_argument("--folds", default="all", help="comma-separated fold names (run in this order), or 'all'")
    ap.add_argument("--repeats", type=int, default=3, help="NB seed sets on the cross-patient fold")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "context_her2st.json"))
    ap.add_argument("--merge", default="", help="comma-separated result files to join (no training)")
    ap.add_argument("--table", default="", help="an .h5ad of the table with both feature keys: read when it exists, "
                    "else written after embedding (parallel runs then hold no images: ≈ 0.4 instead of 2.5 GB each)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        rows, seen = [], set()
        for r in (r for f in args.merge.split(",") for r in json.loads(Path(f).read_text())["rows"]):
            if (k := (r["setting"], r["model"], r["fold"], r["seed_set"])) not in seen:  # first of a repeated run
                seen.add(k)
                rows.append(r)
        out.write_text(json.dumps({"protocol": __doc__.split("Run:")[0].strip(), "rows": rows}, indent=1))
        write_tables(rows, out)
        return
    torch.set_num_threads(1)
    si.settings.progress = False
    si.settings.verbosity = 0
    t0 = time.perf_counter()
    if args.table and Path(args.table).exists():
        import anndata as ad

        adata = ad.read_h5ad(args.table)
    else:
        adata, sdata = load(return_sdata=True)
        si.pp.embed(sdata, "efficientnet_lite0", patch_um=336.0, key_added="X_patch336", cache_dir=DEFAULT_CACHE,
                    accelerator="cpu", progress=False)
        del sdata
        if args.table:
            adata.write_h5ad(args.table)
    adata.obs["library_id"] = adata.obs["library_id"].astype(str)
    by_name = {f.name: f for f in FOLDS}
    folds = FOLDS if args.folds == "all" else [by_name[n] for n in args.folds.split(",")]  # in the order given
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
    write_tables(rows, out)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
