"""Coverage of NB-ensemble predictive intervals before and after conformal calibration (issue 13).

Protocol: benchmarks/_protocol.py (C LOSO folds over C2–C6 and the cross-patient C→A1 fold; 50 HVGs
chosen on the training sections; EfficientNet-Lite0 features). For every fold an NBEnsemble
(5 members, default settings) is trained on the training sections and calibrated cross-conformally
(leave-one-training-section-out, ``ens.calibrate('library_id')``). Coverage = fraction of the test
section's raw counts (spots × genes) inside the interval, measured with
si.metrics.uncertainty_calibration, at nominal 80/90/95 %: uncalibrated NB mixture quantiles,
calibrated per gene, and calibrated with one level shared by all genes ("pooled"; stimg's default
because it held nominal coverage on the cross-patient fold, where per-gene levels over-covered).

Run:  STIMG_BENCH_CACHE=/work/cache/bench_embed OMP_NUM_THREADS=1 python benchmarks/conformal_her2st.py
Writes benchmarks/results/conformal_her2st.{json,csv}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _protocol import EMBED_KEY, FOLDS, fold_data, load, score

import stimg as si
from stimg.models._nb._conformal import ConformalCalibration

LEVELS = (0.8, 0.9, 0.95)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--n-genes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--folds", nargs="*", default=None, help="fold names (default: all)")
    ap.add_argument("--out", default="benchmarks/results/conformal_her2st")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    si.settings.progress = False
    si.settings.verbosity = 1
    t0 = time.perf_counter()
    table = load()
    print(f"loaded {table.n_obs} spots in {time.perf_counter() - t0:.0f}s", flush=True)
    rows, per_gene_rows = [], []
    for fold in FOLDS:
        if a.folds and fold.name not in a.folds:
            continue
        t1 = time.perf_counter()
        d = fold_data(table, fold, n_genes=a.n_genes)
        sub = table[np.r_[d.train, d.test]].copy()
        n_tr = len(d.train)
        si.models.NBRegressor.setup_anndata(sub, embedding_key=EMBED_KEY, genes=d.genes)
        ens = si.models.NBEnsemble(sub, n_members=a.members)
        ens.train(accelerator="cpu", train_indices=np.arange(n_tr), progress=False)
        t_train = time.perf_counter() - t1
        test = sub[n_tr:]
        pred = ens.predict(test)
        t2 = time.perf_counter()
        ens.calibrate("library_id", per_gene=True, progress=False)
        t_cal = time.perf_counter() - t2
        per_gene_cal = ens.calibration_
        pooled_cal = ConformalCalibration.from_scores(per_gene_cal.scores, method="cross", per_gene=False,
                                                      groups=per_gene_cal.groups)
        base = {"fold": fold.name, "kind": fold.kind, "test": fold.test, "n_train": n_tr, "n_test": len(d.test),
                **{f"{k}_nb_ensemble": v for k, v in score(d, pred.mean).items()},
                "train_s": round(t_train, 1), "calibrate_s": round(t_cal, 1)}
        for level in LEVELS:
            for name, cal in (("uncalibrated", None), ("calibrated per gene", per_gene_cal),
                              ("calibrated pooled", pooled_cal)):
                ens.calibration_ = cal
                lo, hi = ens.predict_interval(test, level=level)
                res = si.metrics.uncertainty_calibration(d.y_test, pred.mean, pred.epistemic, lower=lo, upper=hi,
                                                         observed=d.counts_test, var_names=d.genes)
                pg = res.per_gene["all"]
                rows.append({**base, "level": level, "intervals": name, "coverage": res.coverage,
                             "gene_coverage_min": float(pg.min()), "gene_coverage_max": float(pg.max()),
                             "mean_width": float(np.mean(hi - lo)),
                             "calibrated_level_mean": float(np.mean(cal.levels(level, len(d.genes))))
                             if cal is not None else level})
                per_gene_rows.append(pd.DataFrame({"fold": fold.name, "level": level, "intervals": name,
                                                   "gene": d.genes, "coverage": pg.to_numpy()}))
        ens.calibration_ = per_gene_cal
        done = [r for r in rows if r["fold"] == fold.name and r["level"] == 0.9]
        print(fold.name, {r["intervals"]: round(r["coverage"], 3) for r in done},
              f"pcc {base['pcc_nb_ensemble']:.3f} train {t_train:.0f}s calibrate {t_cal:.0f}s", flush=True)
    df = pd.DataFrame(rows)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    pd.concat(per_gene_rows).to_csv(out.with_name(out.name + ".per_gene.csv"), index=False)
    wide = df.pivot_table(index=["fold", "intervals"], columns="level", values="coverage", sort=False)
    print((100 * wide).round(1).to_string())
    out.with_suffix(".json").write_text(json.dumps({
        "config": vars(a), "torch_threads": torch.get_num_threads(), "total_s": round(time.perf_counter() - t0, 1),
        "coverage": {f"{f} | {i}": {str(k): float(v) for k, v in r.items()} for (f, i), r in wide.iterrows()},
    }, indent=1))


if __name__ == "__main__":
    main()
