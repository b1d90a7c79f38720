"""Embedding throughput: pure forward on preloaded tensors vs the full stimg pipeline, in one run.

Pure forward: the encoder's forward pass on already-normalised float tensors held in memory.
Full pipeline: ``stimg.pp._embed.run_encoder`` over the lazy ``PatchDataset`` (crop the µm-sized
window from the section image, resize to 224 px, uint8 batch, normalise, forward), i.e. what
``si.pp.embed`` runs after its (free) cache look-up. Both use the same model object, memory format,
threads and batch size, on the same spots, alternating repeats so that load drifts hit both.

Run:  STIMG_DATA_DIR=/work/shared/data python benchmarks/bench_embed.py [--repeats 3] [--n 256]
Writes benchmarks/results/bench_embed.json.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=256, help="number of spots (C2 then C3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_embed.json"))
    args = ap.parse_args()

    import stimg as si
    from stimg._spatial import sections
    from stimg.encoders import get_encoder
    from stimg.pp._embed import run_encoder
    from stimg.pp._patch_dataset import PatchDataset

    si.settings.progress = False
    sdata = si.datasets.her2st(["C2", "C3"])
    table = sdata.tables["table"]
    secs = sections(sdata)
    # first n spots over the sections
    keep, left = [], args.n
    import dataclasses

    for s in secs:
        k = min(left, s.n_obs)
        keep.append(dataclasses.replace(s, obs_index=s.obs_index[:k], xy=s.xy[:k]))
        left -= k
    keep = [s for s in keep if s.n_obs]
    n = sum(s.n_obs for s in keep)
    enc = get_encoder(args.encoder).eval()
    device = torch.device("cpu")
    t0 = time.perf_counter()
    ds = PatchDataset(keep, table.obs_names.to_numpy(), patch_um=112.0, patch_px=enc.input_px)
    t_ds = time.perf_counter() - t0

    # preloaded, normalised tensors (not timed)
    with torch.inference_mode():
        pre = torch.stack([ds[i] for i in range(n)])
        batches = [enc.preprocess(pre[i:i + args.batch_size].contiguous(memory_format=torch.channels_last))
                   for i in range(0, n, args.batch_size)]
    enc = enc.to(memory_format=torch.channels_last)

    def pure_forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                enc(b)
        return time.perf_counter() - t

    def pipeline() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        feats = run_encoder(enc, ds, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                            progress=False)
        return time.perf_counter() - t, feats

    # warm-up (oneDNN kernel selection)
    with torch.inference_mode():
        enc(batches[0])
    pipeline()
    load_before = os.getloadavg()
    fw, pl = [], []
    feats = None
    for _ in range(args.repeats):
        fw.append(pure_forward())
        dt, feats = pipeline()
        pl.append(dt)
    load_after = os.getloadavg()
    with torch.inference_mode():
        ref = torch.cat([enc(b) for b in batches]).numpy()
    max_diff = float(np.abs(ref - feats).max())

    fw_tp = n / statistics.median(fw)
    pl_tp = n / statistics.median(pl)
    res = {
        "encoder": args.encoder, "batch_size": args.batch_size, "n_patches": n, "repeats": args.repeats,
        "num_workers": args.num_workers, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "device": str(device), "torch": torch.__version__, "platform": platform.platform(),
        "pure_forward_s": fw, "pipeline_s": pl,
        "pure_forward_patches_per_s": fw_tp, "pipeline_patches_per_s": pl_tp, "ratio_pipeline_over_forward": pl_tp / fw_tp,
        "dataset_setup_s": t_ds, "max_abs_feature_diff_pipeline_vs_preloaded": max_diff,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("pure_forward_patches_per_s", "pipeline_patches_per_s",
                                          "ratio_pipeline_over_forward", "loadavg_before", "loadavg_after",
                                          "max_abs_feature_diff_pipeline_vs_preloaded")}, indent=2))


if __name__ == "__main__":
    main()
