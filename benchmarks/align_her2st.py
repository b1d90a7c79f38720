"""Contrastive image–expression alignment on HER2ST (issue 8): honest recall@k and retrieval prediction.

Protocol (benchmarks/_protocol.py): folds ``C LOSO`` (train on four of C2–C6, test on the fifth) and
``C→A1`` (train on C2–C6, test on patient A); image features = EfficientNet-Lite0 (112 µm → 224 px,
frozen, cached); target genes = top-50 HVGs chosen on the training sections only.

Per fold and seed, a :class:`stimg.models.ContrastiveAligner` (CLIP, 128-d, defaults) is trained on the
training sections only, with expression input = log1p counts of the top ``--n-input-genes`` HVGs of the
training sections and image input = the spatial-context features of the patch features
(``--context 500``, the default: ``si.pp.spatial_context(..., radius_um=500)``, each spot's own features
and the mean of its neighbours' within 500 µm, pooled within each section from image features only, so no
expression crosses folds); ``--context 0`` uses the 112 µm patch features alone. Reported on **all spots of
the held-out section**:

* recall@1/5/10 image→gene and gene→image over the whole section (``si.metrics.recall_at_k``) with
  chance = k / n, and what HESCAPE's in-batch protocol (batches of 64) would show for the same model;
* PCC (mean over genes per test slide) of the retrieval prediction (BLEEP: top-k of the training bank,
  ``model.predict``) on the 50 target genes, next to ``RidgeRegressor`` on the frozen patch features
  (``pcc_ridge_frozen``) and on the aligner's image input (``pcc_ridge_input``), ``NBEnsemble`` (5 members)
  on the aligner's image input (``pcc_nb_ensemble``), and ridge on the aligned image embedding (does
  alignment help?), all on the same folds;
* the batch silhouette (scib-metrics, cosine) of the held-out + training image embeddings by section:
  frozen patch features, the aligner's image input, and the aligned embedding.

Run:  OMP_NUM_THREADS=1 STIMG_DATA_DIR=/work/shared/data STIMG_BENCH_CACHE=/work/cache/bench_embed \\
      python benchmarks/align_her2st.py [--seeds 0 1 2] [--context 500]
Writes benchmarks/results/align_her2st_context.json (``--context 0``: align_her2st.json) unless ``--out``.
results/align_her2st.json (patch features, per-feature z-scores: the aligner's default before
``standardize='isotropic'``) is reproduced by ``--context 0 --standardize per_feature``; C→A1 over ten seeds,
both settings: ``--folds C→A1 --seeds 0 1 2 3 4 5 6 7 8 9`` (results/align_her2st_a1_10seeds_{patch,context}.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _protocol import EMBED_KEY, FOLDS, fold_data, load, score

import stimg as si


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-input-genes", type=int, default=1000)
    ap.add_argument("--k-retrieve", type=int, default=50)
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--loss", default="clip")
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument("--context", type=float, default=500.0,
                    help="image input = si.pp.spatial_context of the patch features at this radius in µm (0: the "
                         "patch features alone)")
    ap.add_argument("--standardize", default=None, help="image-feature scaling of the aligner (None: its default)")
    ap.add_argument("--n-latent", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=None, help="initial temperature (None: the loss default)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--folds", nargs="*", default=None, help="subset of fold names (default: all)")
    ap.add_argument("--no-baselines", action="store_true", help="skip ridge / NB ensemble")
    ap.add_argument("--no-silhouette", action="store_true", help="skip the batch silhouette (scib-metrics)")
    ap.add_argument("--out", default=None, help="result file (default: results/align_her2st[_context].json)")
    a = ap.parse_args()
    a.out = a.out or str(Path(__file__).parent / "results" / f"align_her2st{'_context' if a.context else ''}.json")
    torch.set_num_threads(1)
    si.settings.progress = False
    logging.getLogger("stimg").setLevel(logging.WARNING)

    t0 = time.perf_counter()
    adata = load()
    key = EMBED_KEY
    if a.context:  # each spot's features + the mean of its neighbours' within `context` µm, per section
        key = f"{EMBED_KEY}_context"
        si.pp.spatial_context(adata, EMBED_KEY, radius_um=a.context, key_added=key)
    rows = []
    for fold in FOLDS:
        if a.folds and fold.name not in a.folds:
            continue
        tf = time.perf_counter()
        d = fold_data(adata, fold, n_genes=50)
        sub = adata[np.r_[d.train, d.test]].copy()
        is_train = np.isin(sub.obs["library_id"].astype(str).to_numpy(), fold.train)
        inputs = list(si.pp.select_genes(adata, a.n_input_genes, method="hvg", subset=list(fold.train), inplace=False))
        genes = list(dict.fromkeys([*d.genes, *inputs]))  # targets first, then further HVGs
        si.models.ContrastiveAligner.setup_anndata(sub, key, genes=genes)
        test = sub[~is_train].copy()
        base = {"fold": fold.name, "kind": fold.kind, "n_train": int(is_train.sum()), "n_test": int((~is_train).sum()),
                "n_input_genes": len(genes)}
        for seed in a.seeds:
            ts = time.perf_counter()
            model = si.models.ContrastiveAligner(sub, loss=a.loss, dropout=a.dropout, n_latent=a.n_latent,
                                                 temperature=a.temperature, seed=seed,
                                                 **({"standardize": a.standardize} if a.standardize else {}))
            model.train(a.max_epochs, train_indices=is_train, accelerator="cpu", progress=False, lr=a.lr,
                        batch_size=a.batch_size)
            train_s = time.perf_counter() - ts
            zi = model.get_latent_representation(test, modality="image")
            zg = model.get_latent_representation(test, modality="gene")
            rec = si.metrics.recall_at_k(zi, zg, k=(1, 5, 10), names=("image", "gene"), in_batch=64, seed=seed)
            row = {**base, "seed": seed, "train_seconds": train_s, "temperature": model.temperature}
            for _, r in rec.table.iterrows():
                tag = "all" if r["scope"] == "all" else "b64"
                dirn = "i2g" if r["direction"] == "image→gene" else "g2i"
                row[f"R@{r['k']}_{dirn}_{tag}"] = float(r["recall"])
                row[f"chance@{r['k']}_{tag}"] = float(r["chance"])
            for w in ("mean", "similarity", "softmax"):
                pred = model.predict(test, k=a.k_retrieve, weighting=w, genes=d.genes).mean
                row[f"pcc_retrieval_{w}"] = score(d, pred)["pcc"]
            # ridge on the aligned image embedding vs frozen features (same genes, same folds)
            z_all = model.get_latent_representation(sub, modality="image")
            sub.obsm["X_aligned"] = z_all
            rm = si.models.RidgeRegressor().fit(sub, "X_aligned", genes=d.genes, train_indices=is_train)
            row["pcc_ridge_aligned"] = score(d, rm.predict(sub[~is_train]).mean)["pcc"]
            if not a.no_silhouette:
                lib = sub.obs["library_id"].astype(str)
                row["silhouette_batch_frozen"] = si.metrics.silhouette_batch(np.asarray(sub.obsm[EMBED_KEY]), lib)
                if key != EMBED_KEY:
                    row["silhouette_batch_input"] = si.metrics.silhouette_batch(np.asarray(sub.obsm[key]), lib)
                row["silhouette_batch_aligned"] = si.metrics.silhouette_batch(z_all, lib)
            rows.append(row)
            print(fold.name, seed, {k: round(v, 3) for k, v in row.items() if k.startswith(("R@5", "pcc", "chance@5"))},
                  flush=True)
        if not a.no_baselines:  # ridge on the frozen patch features and on the aligner's input; NB on the input
            base_pcc = {}
            for name, k in (("pcc_ridge_frozen", EMBED_KEY), ("pcc_ridge_input", key)):
                rm = si.models.RidgeRegressor().fit(sub, k, genes=d.genes, train_indices=is_train)
                base_pcc[name] = score(d, rm.predict(sub[~is_train]).mean)["pcc"]
            tr_ad = sub[is_train].copy()
            si.models.NBRegressor.setup_anndata(tr_ad, key, genes=d.genes)
            ens = si.models.NBEnsemble(tr_ad, n_members=5)
            ens.train(max_epochs=300, accelerator="cpu", progress=False)
            base_pcc["pcc_nb_ensemble"] = score(d, ens.predict(test).mean)["pcc"]
            for r in rows:
                if r["fold"] == fold.name:
                    r.update(base_pcc)
            print(fold.name, {k: round(v, 3) for k, v in base_pcc.items()}, flush=True)
        print(fold.name, f"{time.perf_counter() - tf:.0f}s", flush=True)
    df = pd.DataFrame(rows)
    metrics = [c for c in df.columns if c.startswith(("R@", "chance@", "pcc", "silhouette", "temperature"))]
    summary = df.groupby(["fold", "kind"], sort=False)[metrics].mean()
    summary["R@5_i2g_over_chance"] = summary["R@5_i2g_all"] / summary["chance@5_all"]
    summary["R@5_g2i_over_chance"] = summary["R@5_g2i_all"] / summary["chance@5_all"]
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summary.round(3).T)
    out = {"config": vars(a), "seconds": time.perf_counter() - t0, "rows": df.to_dict("records"),
           "summary": summary.reset_index().to_dict("records")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=float))
    print("wrote", a.out, f"in {out['seconds']:.0f}s")


if __name__ == "__main__":
    main()
