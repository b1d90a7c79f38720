"""Explaining one patch with LIME over nuclei vs the bare encoder forward of the same patches, in one run.

``si.tl.explain`` with ``n_samples`` LIME perturbations (default 1,000) of one HER2ST C2 spot, for a
frozen-encoder model (ridge, and an NB ensemble with ``--nb``) on EfficientNet-Lite0 features
(112 µm → 224 px, full resolution), on ``--threads`` CPU threads (default 2). It includes
everything the call does: cutting the patch, segmenting its nuclei, building and batching the
perturbed patches through the model's encoder, the model's predictions, the per-gene LIME fits,
the faithfulness check (top-scored vs random equal-area nuclei hidden) and writing the result.
The reference is the bare encoder forward (``run_encoder``: uint8 batch → normalise → network,
channels-last, same batch size) of the same number of perturbed patches already in memory. The
two alternate over ``--repeats`` so that load drifts hit both; the ratio of medians is reported, and the
process CPU time of each call (all threads) with the load average, since the machine may be shared.

Run:  STIMG_DATA_DIR=/work/shared/data STIMG_BENCH_CACHE=/work/cache/bench_embed \\
      python benchmarks/bench_explain.py [--n-samples 1000] [--repeats 2] [--threads 2] [--nb]
Writes benchmarks/results/bench_explain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


class _Preloaded(torch.utils.data.Dataset):
    """uint8 patches already in memory, served a batch at a time."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, idx):
        return self.x[torch.as_tensor(idx)]

    @staticmethod
    def collate(items):
        return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--spot", default=None, help="obs name; default: the C2 spot with the median number of nuclei "
                                                  "among 12 spread over the section")
    ap.add_argument("--nb", action="store_true", help="also time an NB ensemble (5 members)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_explain.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import stimg as si
    from stimg.pp._embed import run_encoder
    from stimg.segmenters import segment_nuclei
    from stimg.tl._explain import _hide_color, _patch_labels
    from stimg.tl._explain_engine import PerturbedPatches

    si.settings.progress = False
    cache = os.environ.get("STIMG_BENCH_CACHE")
    sdata = si.datasets.her2st("C2")
    si.pp.embed(sdata, "efficientnet_lite0", cache_dir=cache, accelerator="cpu")
    table = sdata.tables["table"]
    key = "X_efficientnet_lite0"
    genes = ["ERBB2", "CD74"]
    models = {"ridge": si.models.RidgeRegressor(n_components=64).fit(table, key, genes=genes)}
    if args.nb:
        si.models.NBRegressor.setup_anndata(table, embedding_key=key, genes=genes)
        ens = si.models.NBEnsemble(table, n_members=5)
        ens.train(max_epochs=30, accelerator="cpu", progress=False)
        models["nb_ensemble"] = ens

    ds = si.pp.extract_patches(sdata)
    if args.spot is None:  # a typical patch: median nucleus count among spots spread over the section
        cand = np.linspace(0, len(ds) - 1, 12).astype(int)
        counts = [int(segment_nuclei(ds.crop(i), mpp=float(ds.mpp[i])).max()) for i in cand]
        item = int(cand[np.argsort(counts)[len(counts) // 2]])
    else:
        item = int(np.flatnonzero(ds.obs_names == args.spot)[0])
    spot = str(ds.obs_names[item])
    crop, patch = ds.crop(item), ds.patch(item)
    lab, _ = _patch_labels(segment_nuclei(crop, mpp=float(ds.mpp[item])), patch.shape[0])
    k = int(lab.max())
    z = np.random.default_rng(0).integers(0, 2, (args.n_samples, k))
    z[0] = 1
    pert = PerturbedPatches(patch, lab, _hide_color(patch, lab, "tissue"), z)
    x = pert.__getitems__(list(range(len(pert))))  # materialised once: the bare forward reads memory
    from stimg.encoders import get_encoder

    enc = get_encoder("efficientnet_lite0")
    dev = torch.device("cpu")

    cpu: dict[str, list[float]] = {}

    def bare() -> float:
        t, c = time.perf_counter(), time.process_time()
        run_encoder(enc, _Preloaded(x), batch_size=args.batch_size, num_workers=0, device=dev, progress=False)
        cpu.setdefault("bare_forward", []).append(time.process_time() - c)
        return time.perf_counter() - t

    def explain(name, model) -> float:
        t, c = time.perf_counter(), time.process_time()
        si.tl.explain(sdata, model, genes=genes, spots=[spot], n_samples=args.n_samples, batch_size=args.batch_size,
                      accelerator="cpu", overwrite=True)
        cpu.setdefault(f"explain_{name}", []).append(time.process_time() - c)
        return time.perf_counter() - t

    bare()  # warm-up: oneDNN primitives for this batch shape
    cpu.clear()
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {"bare_forward": [], **{f"explain_{m}": [] for m in models}}
    for _ in range(args.repeats):
        times["bare_forward"].append(bare())
        for name, model in models.items():
            times[f"explain_{name}"].append(explain(name, model))
    load1 = os.getloadavg()
    res = table.uns["si_explain"]
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "spot": spot, "n_nuclei": k, "n_samples": args.n_samples, "genes": genes, "threads": args.threads,
        "batch_size": args.batch_size, "encoder": "efficientnet_lite0", "patch": "112 µm → 224 px",
        "times_s": times, "median_s": med,
        "cpu_s": cpu, "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "ratio_explain_over_bare": {m: med[f"explain_{m}"] / med["bare_forward"] for m in models},
        "target_s": 30.0, "meets_target": {m: med[f"explain_{m}"] < 30.0 for m in models},
        "last_summary": res["summary"].round(4).to_dict(orient="list"),
        "feature_cosine": float(res["spots"]["feature_cosine"].iloc[0]),
        "loadavg_before": load0, "loadavg_after": load1, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "platform": platform.platform(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    keys = ("spot", "n_nuclei", "median_s", "median_cpu_s", "ratio_explain_over_bare", "loadavg_before", "loadavg_after")
    print(json.dumps({k: out[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
