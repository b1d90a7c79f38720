"""Benchmark: NB ensemble prediction on the log1p scale, summation (before) vs table interpolation (after).

Run:  python benchmarks/bench_nb_predict.py  [--members 5 --spots 10000 --genes 300 --threads 2]
Writes benchmarks/results/bench_nb_predict.json: both wall times measured in this run, their ratio, and
the max absolute differences of E[log1p Y] and Var[log1p Y] between the two (and of each against a
wide-support reference on a subsample). The NB parameters come from a real trained ensemble on synthetic
data (so their range is what the model produces), tiled to ``--spots``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import stimg as si
from stimg.models._nb._module import build_log1p_table, nb_log1p_moments, nb_log1p_moments_fast


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--spots", type=int, default=10_000)
    ap.add_argument("--genes", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/bench_nb_predict.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    si.settings.progress = False
    si.settings.verbosity = 1
    adata = si.datasets.synthetic(1000, a.genes, image=False, as_anndata=True, seed=0)
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    ens = si.models.NBEnsemble(adata, n_members=a.members)
    ens.train(max_epochs=30, accelerator="cpu")
    reps = int(np.ceil(a.spots / adata.n_obs))
    params = []
    for m in ens.members:
        r, b = m.get_nb_params(adata)
        params.append((np.tile(r, (reps, 1))[: a.spots], np.tile(b, (reps, 1))[: a.spots]))

    def run(fn):
        t0 = time.perf_counter()
        out = [fn(r, b) for r, b in params]
        return time.perf_counter() - t0, out

    t0 = time.perf_counter()
    build_log1p_table()  # what the first prediction of a process pays once (kept apart from the per-call time)
    t_build = time.perf_counter() - t0
    nb_log1p_moments_fast(params[0][0][:1], params[0][1][:1])  # builds the process's table (warm-up)
    t_sum, out_sum = run(nb_log1p_moments)
    t_fast, out_fast = run(nb_log1p_moments_fast)
    d_m1 = max(float(np.abs(f[0] - s[0]).max()) for f, s in zip(out_fast, out_sum, strict=True))
    d_v = max(float(np.abs(f[1] - s[1]).max()) for f, s in zip(out_fast, out_sum, strict=True))
    # both against a wide-support summation (mean + 40 sd, ≥ 64 exact counts) on 1,000 spots of member 0
    r0, b0 = params[0][0][:1000], params[0][1][:1000]
    ref = nb_log1p_moments(r0, b0, n_sd=40.0, min_support=64.0)
    fast0, sum0 = nb_log1p_moments_fast(r0, b0), nb_log1p_moments(r0, b0)
    res = {
        "members": a.members, "spots": a.spots, "genes": a.genes, "torch_threads": a.threads,
        "predict_sum_seconds": round(t_sum, 3), "predict_table_seconds": round(t_fast, 3),
        "speedup": round(t_sum / t_fast, 1), "table_build_seconds_once_per_process": round(t_build, 3),
        "max_abs_diff_E_log1p": d_m1, "max_abs_diff_Var_log1p": d_v,
        "vs_wide_reference": {
            "table_max_abs_err_E": float(np.abs(fast0[0] - ref[0]).max()),
            "sum_max_abs_err_E": float(np.abs(sum0[0] - ref[0]).max()),
            "table_max_abs_err_Var": float(np.abs(fast0[1] - ref[1]).max()),
            "sum_max_abs_err_Var": float(np.abs(sum0[1] - ref[1]).max()),
        },
        "range_r": [float(min(p[0].min() for p in params)), float(max(p[0].max() for p in params))],
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    print(json.dumps(res, indent=2))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
