"""Speed of ``si.pp.spatial_context`` on a million synthetic spots (issue 15: "1M spots in seconds").

Setup: 1,000,000 spots on Visium's hexagonal 100 µm grid (4 sections of 250,000, so pooling runs per
section), 0.5 µm/px full-resolution coordinates, 64-d float32 features (PCA-sized; time grows
linearly with the width). Calls, each timed once after a warm-up on 10,000 spots:

* ``mean`` at 250 µm (≈ 19 neighbours per spot),
* ``gaussian`` at 250 µm (distances needed),
* multi-scale ``mean`` at 150 + 300 µm,
* the defaults (``concat`` at 500 µm: ≈ 90 neighbours per spot on this grid).

Reference measured in the same run: building one :class:`scipy.spatial.cKDTree` (scipy's defaults)
over all 1M spot centres, and one pass over the feature matrix (``x.sum(0)``). Each call is reported
in wall-clock and CPU seconds (all threads; ``spatial_context`` pools sections in parallel threads)
and as ratios to the k-d tree build, so numbers from busy and quiet machines compare.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_spatial_context.py [--n 1000000] [--dim 64]
Writes benchmarks/results/bench_spatial_context.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def hex_table(n: int, dim: int, n_sections: int = 4, pitch_um: float = 100.0, mpp: float = 0.5, seed: int = 0):
    """AnnData with ``n`` spots on a hexagonal grid, split into ``n_sections`` sections."""
    import anndata as ad
    import pandas as pd

    per = n // n_sections
    side = int(np.ceil(np.sqrt(per)))
    r, c = np.divmod(np.arange(per), side)
    xy_um = np.c_[c * pitch_um + (r % 2) * pitch_um / 2, r * pitch_um * np.sqrt(3) / 2]
    xy = np.tile(xy_um / mpp, (n_sections, 1))  # every section in its own image frame (same pixels)
    lib = np.repeat([f"S{k}" for k in range(n_sections)], per)
    x = np.random.default_rng(seed).normal(size=(len(lib), dim)).astype(np.float32)
    a = ad.AnnData(obs=pd.DataFrame({"library_id": pd.Categorical(lib)}, index=[str(i) for i in range(len(lib))]),
                   obsm={"spatial": xy, "X_feat": x})
    a.uns["spatial"] = {s: {"images": {}, "scalefactors": {"microns_per_pixel": mpp, "spot_diameter_um": 55.0}}
                        for s in np.unique(lib)}
    return a


def timed(fn):
    """Wall-clock and CPU seconds (all threads of this process) of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_spatial_context.json"))
    args = ap.parse_args()
    from scipy.spatial import cKDTree

    import stimg as si

    si.settings.verbosity = 0
    warm = hex_table(10_000, args.dim)
    si.pp.spatial_context(warm, "X_feat", radius_um=250, inplace=False)
    adata = hex_table(args.n, args.dim)
    xy_all = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    t_tree, c_tree, _ = timed(lambda: cKDTree(xy_all))
    t_pass, _, _ = timed(lambda: adata.obsm["X_feat"].sum(0))
    calls = {
        "mean 250 µm": {"radius_um": 250.0, "method": "mean"},
        "gaussian 250 µm": {"radius_um": 250.0, "method": "gaussian"},
        "mean 150+300 µm": {"radius_um": [150.0, 300.0], "method": "mean"},
        "default (concat 500 µm)": {},
    }
    results = {}
    for name, kw in calls.items():
        t, c, out = timed(lambda kw=kw: si.pp.spatial_context(adata, "X_feat", inplace=False, **kw))
        results[name] = {"seconds": round(t, 3), "cpu_seconds": round(c, 3), "ratio_to_kdtree_build": round(t / t_tree, 2),
                         "cpu_ratio_to_kdtree_build": round(c / c_tree, 2), "out_dim": int(out.shape[1])}
        print(f"{name:>24}: {t:6.2f} s wall, {c:6.2f} s CPU  ({t / t_tree:5.1f}× / {c / c_tree:5.1f}× one k-d tree build)",
              flush=True)
    rec = {"n_spots": adata.n_obs, "dim": args.dim, "n_sections": 4, "grid": "hexagonal, 100 µm pitch",
           "reference": {"kdtree_build_s": round(t_tree, 3), "kdtree_build_cpu_s": round(c_tree, 3),
                         "feature_pass_s": round(t_pass, 4)},
           "calls": results, "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                                         "cpu_count": os.cpu_count()},
           "load_average_1min": round(os.getloadavg()[0], 2)}
    print(f"reference: k-d tree build {t_tree:.2f} s wall, {c_tree:.2f} s CPU; load average {rec['load_average_1min']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
