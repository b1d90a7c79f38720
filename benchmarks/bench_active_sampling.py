"""Scaling benchmark of SCRL active sampling (issues 5, 12 and 16).

Each size runs in a fresh subprocess (peak RSS from ``resource.getrusage`` is per process):
``si.datasets.synthetic(n, 50, image=False, reference=True, as_anndata=True)`` (embedding
``obsm['X_synthetic']``); the single-cell prior is fitted on the synthetic reference (2,000 cells;
``time_prior_fit_s``, independent of the number of spots), then
``si.tl.active_sample(adata, 0.1, method='scrl', prior=prior)`` with SCRL's default settings
(``time_sampling_s``: embedding revealed spots as queries round by round, labels, 20 policy rounds).
The total (prior fit + sampling) is the done-when number (< 60 s for 100k spots on 2 cores).

Reference in the same run (machines are shared, so absolute times drift with load):
``si.tl.active_sample(adata, 0.1, method='kmeans')`` on the same spots (``time_reference_kmeans_s``;
two-level k-means above 2·10⁸ spots × budget) and ``ratio_total_vs_kmeans``. The load average
before and after each size is recorded.
Memory: ``peak_rss_during_sampling_mb`` (resident memory polled every 20 ms during the SCRL call;
the synthetic data are already in memory) and the process peak ``peak_rss_mb``. With several
sizes, ``scaling`` gives the time per spot at the largest size over the smallest (issue 16:
100k vs 1M within 1.5×).

Usage::

    python benchmarks/bench_active_sampling.py                      # 10k, 30k, 100k, scVI prior
    python benchmarks/bench_active_sampling.py --sizes 100000 --encoder pca --threads 2
    python benchmarks/bench_active_sampling.py --sizes 100000 1000000 --out results/scrl_scale.json

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


class _RSSPeak:
    """Peak resident memory of this process while a block runs (``/proc/self/statm`` polled every 20 ms)."""

    def __enter__(self):
        import threading

        self.peak = self.before = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20




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
    with _RSSPeak() as mem:
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
        "rss_before_sampling_mb": round(mem.before, 1), "peak_rss_during_sampling_mb": round(mem.peak, 1),
        "time_per_spot_ms": round(1e3 * t_total / n, 4),
        "final_reward": float(rounds["reward"].iloc[-1]), "R_sc": float(rounds["R_sc"].iloc[-1]),
        "R_type": float(rounds["R_type"].iloc[-1]), "R_spa": float(rounds["R_spa"].iloc[-1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--encoder", default="scvi", choices=["scvi", "pca"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (OMP/MKL/torch)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/active_sampling_<encoder>.json)")
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
    if len(results) > 1:  # cost growth: time per spot at the largest size over the smallest
        lo, hi = results[0], results[-1]
        scaling = {"sizes": [lo["n_spots"], hi["n_spots"]],
                   "time_per_spot_ratio_total": round(hi["time_per_spot_ms"] / lo["time_per_spot_ms"], 3),
                   "time_per_spot_ratio_sampling": round((hi["time_sampling_s"] / hi["n_spots"])
                                                         / (lo["time_sampling_s"] / lo["n_spots"]), 3)}
        print(scaling, flush=True)
    else:
        scaling = None
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    path = a.out or HERE / "results" / f"active_sampling_{a.encoder}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results, "scaling": scaling}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
