"""Time and peak memory of ``si.pp.extract_patches`` over every spot of HER2ST C2–C6.

Reference measured in the same run: a bare loop of numpy slicing + PIL resize over images
already decoded in memory (the least work any patch reader can do). Peak memory is the kernel's
peak-RSS counter (VmHWM), reset after the sections are read, so it covers the extraction only.
Writes JSON.

    STIMG_DATA_DIR=../shared/data python benchmarks/bench_patches.py
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak RSS since the last :func:`reset_peak` (VmHWM), else since the process started."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ≥ 4.0), so reading the data does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(sections=("C2", "C3", "C4", "C5", "C6"), num_workers: int = 0) -> dict:
    import torch
    from PIL import Image

    import stimg as si

    si.settings.progress = False
    si.settings.verbosity = 1
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    sdata = si.datasets.her2st(list(sections))
    t_read = time.perf_counter() - t0
    rss_loaded = rss_mb()
    peak_reset = reset_peak()

    # stimg: build the dataset and pull every patch through a DataLoader
    t0 = time.perf_counter()
    ds = si.pp.extract_patches(sdata, patch_um=112, patch_px=224)
    n = 0
    for batch in torch.utils.data.DataLoader(ds, batch_size=64, num_workers=num_workers, collate_fn=ds.collate):
        n += batch.shape[0]
    t_stimg = time.perf_counter() - t0
    peak_stimg = peak_mb()

    # reference: preloaded numpy images, bare slicing + resize (no padding, no checks)
    imgs = {lib: np.asarray(sdata.images[f"{lib}_full_image"].data) for lib in sections}
    t0 = time.perf_counter()
    for i in range(len(ds)):
        lib = ds.library_ids[ds._section[i]]
        x0, y0, w = ds.window(i)
        crop = np.moveaxis(imgs[lib][:, max(y0, 0):y0 + w, max(x0, 0):x0 + w], 0, -1)
        np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((224, 224), Image.Resampling.BILINEAR))
    t_ref = time.perf_counter() - t0

    out = {
        "benchmark": "extract_patches",
        "sections": list(sections),
        "n_patches": n,
        "patch": "112 µm → 224 px",
        "num_workers": num_workers,
        "read_sections_s": round(t_read, 2),
        "extract_all_s": round(t_stimg, 3),
        "patches_per_s": round(n / t_stimg, 1),
        "reference_bare_loop_s": round(t_ref, 3),
        "ratio_stimg_over_reference": round(t_stimg / t_ref, 3),
        "rss_after_reading_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(peak_stimg, 1),
        "extra_peak_over_loaded_mb": round(peak_stimg - rss_loaded, 1),
        "peak_counter_reset_after_reading": peak_reset,
        "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    return out


if __name__ == "__main__":
    res = main()
    print(json.dumps(res, indent=2))
    out = Path(__file__).parent / "results" / "bench_patches.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
