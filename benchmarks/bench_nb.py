"""Benchmark: train one NBRegressor (300 genes, ~1,000 spots, frozen features) on 2 CPU threads.

Run:  python benchmarks/bench_nb.py  [--spots 1000 --genes 300 --epochs 100 --threads 2]
Writes benchmarks/results/bench_nb.json. Target (issue 4): < 60 s wall time for training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import stimg as si


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spots", type=int, default=1000)
    ap.add_argument("--genes", type=int, default=300)
    ap.add_argument("--dim", type=int, default=1280, help="feature width (EfficientNet-Lite0: 1280)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/bench_nb.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    si.settings.progress = False
    si.settings.verbosity = 1
    adata = si.datasets.synthetic(a.spots, a.genes, embedding_dim=a.dim, image=False, as_anndata=True, seed=0)
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    model = si.models.NBRegressor(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=a.epochs, accelerator="cpu", early_stopping=False, validation_size=0.0)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = model.predict(adata)
    t_pred = time.perf_counter() - t0
    y = np.log1p(adata.X.toarray())
    res = {
        "n_spots": a.spots, "n_genes": a.genes, "feature_dim": a.dim, "epochs": a.epochs,
        "torch_threads": torch.get_num_threads(), "train_seconds": round(t_train, 2),
        "predict_log1p_seconds": round(t_pred, 2), "target_seconds": 60, "passed": t_train < 60,
        "train_pcc_sanity": round(si.metrics.pearson(y, pred.mean).mean, 3),
        "final_train_nll": float(model.history["elbo_train"].iloc[-1, 0]),
        "cpu_count": os.cpu_count(), "load_avg_1min_at_end": os.getloadavg()[0],
        "python": platform.python_version(), "torch": torch.__version__,
    }
    print(json.dumps(res, indent=2))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
