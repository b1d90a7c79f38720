"""Scaling benchmark of SCRL active sampling (issues 5 and 12).

Each size runs in a fresh subprocess (peak RSS from ``resource.getrusage`` is per process):
``si.datasets.synthetic(n, 50, image=False, reference=True, as_anndata=True)`` (embedding
``obsm['X_synthetic']``); the single-cell prior is fitted on the synthetic reference (2,000 cells;
``time_prior_fit_s``, independent of the number of spots), then
``si.tl.active_sample(adata, 0.1, method='scrl', prior=prior)`` with SCRL's default settings
(``time_sampling_s``: embedding revealed spots as queries round by round, labels, 20 policy rounds).
The total (prior fit + sampling) is the done-when number (< 60 s for 100k spots on 2 cores).

Reference in the same run (machines are shared, so absolute times drift with load):
``si.tl.active_sample(adata, 0.1, method='kmeans')`` on the same spots (``time_reference_kmeans_s``)
and ``ratio_total_vs_kmeans``. The load average before and after each size is recorded.

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
    si.tl.active_sample(adata, 0.1, method="scrl", embedding_key="X_synthetic", prior=prior, seed=0)
    t_sample = time.perf_counter() - t2
    t_total = time.perf_counter() - t1
    t3 = time.perf_counter()
    si.tl.active_sample(adata, 0.1, method="kmeans", embedding_key="X_synthetic", seed=0, key_added="ref")
    t_ref = time.perf_counter() - t3
    rounds = adata.uns["si_sampled"]["rounds"]
    import torch

    return {
        "n_spots": n, "budget": int(adata.obs["si_sampled"].sum()), "n_rounds": int(len(rounds)),
        "encoder": encoder, "torch_threads": torch.get_num_threads(), "cpu_threads_env": threads,
        "time_data_s": round(t_data, 2), "time_prior_fit_s": round(t_prior, 2),
        "time_sampling_s": round(t_sample, 2), "time_total_s": round(t_total, 2),
        "time_reference_kmeans_s": round(t_ref, 2), "ratio_total_vs_kmeans": round(t_total / max(t_ref, 1e-9), 2),
        "scrl_settings": adata.uns["si_sampled"]["params"]["sampler"],
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
        load_before = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--_child", str(n), "--encoder", a.encoder,
                              "--threads", str(a.threads)], env=env, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["loadavg_before"], res["loadavg_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
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
