"""Does the round-1 model's uncertainty find its own errors? HER2ST A1 and C2–C6, single thread.

For every section and seed: the simulation's initial set (k-means on the image features, + one spot
of each missed class), a :class:`~stimg.models.SpotClassifier` trained on it (as in round 1 of
``annotation_her2st.py``; a few training settings and a 5-model ensemble — probabilities averaged
over five seeds — for comparison), then, over the unlabelled spots,

- ``auc``: AUROC of the uncertainty score for "the model's prediction is wrong",
- ``err_top``: error rate among the ``n_new`` most uncertain spots (what the active rule reveals),
- ``err_all``: error rate among all unlabelled spots (what ``random`` reveals, in expectation),
- ``gain``: ``(err_top − err_all) · n_new / n_spots``, the share of spots that one round of the active
  rule corrects beyond random by revealing labels alone (before any retraining).

    OMP_NUM_THREADS=1 STIMG_BENCH_CACHE=/work/cache/bench_embed \\
        python benchmarks/annotation_uncertainty_her2st.py --out benchmarks/results/annotation_uncertainty_her2st
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from _protocol import C_SECTIONS, CROSS_PATIENT, EMBED_KEY, load  # noqa: E402

import stimg as si  # noqa: E402
from stimg.models import SpotClassifier  # noqa: E402
from stimg.tl import entropy, least_confidence, margin  # noqa: E402
from stimg.tl._annotate import initial_set  # noqa: E402

LABELS = {CROSS_PATIENT: "pathologist_label", **{s: "expression_cluster" for s in C_SECTIONS}}
TRAINING = {"default": {}, "10_epochs": {"max_epochs": 10}, "20_epochs": {"max_epochs": 20},
            "weight_decay_1e-2": {"weight_decay": 1e-2}, "lr_3e-4": {"lr": 3e-4}, "ensemble_5": {"n_models": 5}}
SCORES = {"least_confidence": least_confidence, "margin": margin, "entropy": entropy}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", default=[CROSS_PATIENT, *C_SECTIONS])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="benchmarks/results/annotation_uncertainty_her2st")
    args = p.parse_args()
    torch.set_num_threads(1)
    si.settings.progress = False
    table = load([s for s in [*C_SECTIONS, CROSS_PATIENT] if s in args.sections])
    rows = []
    for sec in args.sections:
        sub = table[table.obs["library_id"].astype(str) == sec]
        sub = sub[sub.obs[LABELS[sec]].notna().to_numpy()].copy()
        truth = sub.obs[LABELS[sec]].astype(str).to_numpy(dtype=object)
        n_new = 55 if len(truth) >= 300 else 20
        emb = np.asarray(sub.obsm[EMBED_KEY], dtype=np.float32)
        for seed in args.seeds:
            init = initial_set(emb, n_new, np.random.default_rng(seed), truth=truth)  # as simulate_annotation
            lab = np.full(len(truth), None, dtype=object)
            lab[init] = truth[init]
            sub.obs["_lab"] = pd.Series(lab, index=sub.obs_names, dtype=object)
            cand = np.setdiff1d(np.arange(len(truth)), init)
            for name, kw in TRAINING.items():
                kw = dict(kw)
                n_models, epochs, probas = kw.pop("n_models", 1), kw.pop("max_epochs", None), []
                for k in range(n_models):
                    model = SpotClassifier(sub, "_lab", embedding_key=EMBED_KEY, seed=seed + 1000 * k)
                    model.train(epochs, seed=seed + 1000 * k + 1, progress=False, **kw)
                    probas.append(model.predict_proba()[sorted(model.classes_)].to_numpy())
                proba = np.mean(probas, axis=0)
                pred = np.asarray(sorted(model.classes_), dtype=object)[proba.argmax(1)]
                wrong = (pred != truth)[cand]
                for sname, f in SCORES.items():
                    s = f(proba[cand])
                    top = np.argsort(-s, kind="stable")[:n_new]
                    rows.append({"section": sec, "seed": seed, "training": name, "score": sname, "n_new": n_new,
                                 "n_spots": len(truth), "auc": roc_auc_score(wrong, s),
                                 "err_top": wrong[top].mean(), "err_all": wrong.mean(),
                                 "gain": (wrong[top].mean() - wrong.mean()) * n_new / len(truth),
                                 "f1_unlabelled": si.metrics.weighted_f1(truth[cand], pred[cand])})
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(f"{args.out}.csv", index=False)
    summarise(df, args.out)


def summarise(df: pd.DataFrame, out: str) -> pd.DataFrame:
    """Mean over seeds per section, training and score (+ sd of the AUROC); written to ``{out}.summary.csv``."""
    g = df.groupby(["section", "training", "score"], sort=False)
    summary = g[["auc", "err_top", "err_all", "gain", "f1_unlabelled"]].mean().round(3)
    summary["auc_sd"] = g["auc"].std(ddof=1).round(3)
    summary.to_csv(f"{out}.summary.csv")
    pd.set_option("display.width", 200)
    print(summary.xs("least_confidence", level="score").to_string())
    print(f"wrote {out}.csv and {out}.summary.csv")
    return summary


if __name__ == "__main__":
    main()
