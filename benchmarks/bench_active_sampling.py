"""Scaling benchmark of SCRL active sampling (issue 5).

Each size runs in a fresh subprocess (peak RSS from ``resource.getrusage`` is per process):
``si.datasets.synthetic(n, 50, image=False, reference=True, as_anndata=True)`` (embedding
``obsm['X_synthetic']``); the single-cell prior is fitted on the synthetic reference (2,000 cells;
``time_prior_fit_s``, independent of the number of spots), then
``si.tl.active_sample(adata, 0.1, method='scrl', n_rounds=20, prior=prior)`` (``time_sampling_s``:
embedding the spots as queries, labels, 20 policy rounds).

Usage::

    python benchmarks/bench_active_sampling.py                      # 10k, 30k, 100k, scVI prior
    python benchmarks/bench_active_sampling.py --sizes 100000 --encoder pca --threads 2

Writes ``benchmarks/results/active_sampling_<encoder>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _one(n: int, encoder: str, threads: int) -> dict:
    import resource
    import time

    import stimg as si

    si.settings.progress = False
    t0 = time.perf_counter()
    adata, ref = si.datasets.synthetic(n, 50, image=False, reference=True, as_anndata=True, seed=0)
    t_data = time.perf_counter() - t0
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    prior = si.models.SingleCellPrior(ref, "cell_type", encoder=encoder, seed=0).fit(adata.var_names)
    t_prior = time.perf_counter() - t1
    t2 = time.perf_counter()
    si.tl.active_sample(adata, 0.1, method="scrl", n_rounds=20, embedding_key="X_synthetic", prior=prior, seed=0)
    t_sample = time.perf_counter() - t2
    t_total = time.perf_counter() - t1
    rounds = adata.uns["si_sampled"]["rounds"]
    import torch

    return {
        "n_spots": n, "budget": int(adata.obs["si_sampled"].sum()), "n_rounds": int(len(rounds)),
        "encoder": encoder, "torch_threads": torch.get_num_threads(), "cpu_threads_env": threads,
        "time_data_s": round(t_data, 2), "time_prior_fit_s": round(t_prior, 2),
        "time_sampling_s": round(t_sample, 2), "time_total_s": round(t_total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_data_mb": round(rss_data, 1),
        "final_reward": float(rounds["reward"].iloc[-1]), "R_sc": float(rounds["R_sc"].iloc[-1]),
        "R_type": float(rounds["R_type"].iloc[-1]), "R_spa": float(rounds["R_spa"].iloc[-1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--encoder", default="scvi", choices=["scvi", "pca"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (OMP/MKL/torch)")
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child is not None:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(_one(a._child, a.encoder, a.threads)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               OPENBLAS_NUM_THREADS=str(a.threads))
    results = []
    for n in a.sizes:
        out = subprocess.run([sys.executable, __file__, "--_child", str(n), "--encoder", a.encoder,
                              "--threads", str(a.threads)], env=env, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(res, flush=True)
        results.append(res)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    path = HERE / "results" / f"active_sampling_{a.encoder}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
