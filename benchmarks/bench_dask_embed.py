"""Benchmark: embed 50 slides through a local dask.distributed cluster vs the single-process path.

Data: the real HER2ST sections C2–C6 (full-resolution H&E, ~9,900 × 9,300 px, 0.69 µm/px) written
once to a zarr-backed SpatialData (chunks of 1024 px), so images are read lazily from disk. The 50
slides are 10 copies of each section: copy ``i`` keeps every 5th spot starting at ``i mod 5`` (each
spot twice over the cohort), with its own coordinate system and a lazy reference to its section's
image (nothing is loaded when the cohort is built).

Runs, each in a fresh process (features not cached, EfficientNet-Lite0 at 224 px, batch 64), in the
symmetric order single1, dask, single2, dask, single1, so that a machine load drifting over the
benchmark weighs on single1 and dask alike (the 1-minute load average is recorded around each run;
on a shared machine each run waits until 3 GB of memory are available, and a run killed by the
OOM killer is repeated; with ``STIMG_BENCH_NO_IMAGE_CACHE=1`` the single-process runs read every
patch window lazily, as that path does for slides larger than its 2 GB image cache, instead of
holding ~2 GB of whole images):

* ``single1``: the single-process path with 1 torch thread (the reference for identical features),
* ``single2``: the single-process path with 2 torch threads (the same 2 cores as the cluster),
* ``dask``: ``si.pp.embed(..., client=Client(LocalCluster(n_workers=2, threads_per_worker=1)))``.

Reported: throughput (spots/s) and the ratios dask/single2 and dask/single1; the driver's peak
memory during the call (RSS sampled every 20 ms, above the RSS just before the call) against one
slide's full-resolution image; whether the driver imported torch; and the features of ``dask`` vs
``single1`` (bit-identical expected: same batches, one thread per process) and vs ``single2``.
The single-process path reads each slide's image whole (it fits its 2 GB cache); each dask task
reads only the image chunks its spots' patches touch. A warm-up call on 4 slides precedes each timed call (imports, encoder weights, kernels). The
cluster runs with dask's worker profiler off (it costs ~30 % CPU per spot on this machine).

Compare CPU per spot (driver + workers) rather than wall time on a shared machine. The driver's CPU
includes the in-process scheduler's periodic work (~3 % of a core while idle, as much again in the
workers), so it grows with wall time when other jobs slow the run down. Until the tasks ran with
glibc's default allocator thresholds (``stimg.pp._distributed._task_malloc``; the Nanny's
``MALLOC_TRIM_THRESHOLD_`` had fixed the mmap threshold at 128 KiB), the workers used ~25 % more
CPU per spot than the same task function in one process (py-spy / ``/usr/bin/time``: the extra was
system time, page faults of freshly mapped buffers).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_dask_embed.py [--cache /work/cache/bench_dask] [--runs 5 | --order single1,dask,single1]
        [--copies 2 --results /tmp/bench_dask_10slides.json]   # a quick check on 10 slides (367 spots)

Writes ``benchmarks/results/bench_dask_embed.json`` (or ``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
N_COPIES = int(os.environ.get("STIMG_BENCH_COPIES", "10"))  # 10 × 5 = 50 slides (fewer for a smoke test)
# 1,820 spots in tasks of 2 batches: 15 tasks, so the 2 workers finish within one small task of each other
# (tasks of 256 leave one worker idle for a whole task at the end: ≤ 89 % of the cluster busy)
SPOTS_PER_TASK = 128
MIN_FREE_BYTES = int(3e9)  # wait for this much available memory before each run (a shared machine)
HERE = Path(__file__).resolve().parent


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_bytes(path: str, field: str) -> int:
    """A ``kB`` field of a ``/proc`` file (``MemAvailable:`` of ``/proc/meminfo``, ``VmRSS:`` of ``/proc/self/status``), in bytes."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _available() -> int:
    """MemAvailable of the machine in bytes."""
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def _wait_for_memory(need: int, timeout: float = 1800.0) -> float:
    """Sleep until the machine has ``need`` bytes available (a shared machine); seconds waited."""
    t0 = time.perf_counter()
    while _available() < need and time.perf_counter() - t0 < timeout:
        time.sleep(10)
    time.sleep(0 if time.perf_counter() - t0 < 1 else 5)
    return time.perf_counter() - t0


def _rss() -> int:
    return _proc_bytes("/proc/self/status", "VmRSS:")


class _PeakRSS:
    """Sample this process's RSS every 20 ms in a thread; ``peak`` after ``stop``."""

    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def prepare(cache: Path) -> Path:
    """Write C2–C6 (images chunked 1024 px, spots, table) to a zarr SpatialData once."""
    path = cache / "her2st_c2_c6.zarr"
    if path.exists():
        return path
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    import stimg as si

    si.settings.progress = False
    sdata = si.datasets.her2st(SECTIONS, extras=False)
    for k in list(sdata.images):
        img = sdata.images[k]
        sdata.images[k] = Image2DModel.parse(img.data.rechunk((3, 1024, 1024)), dims=("c", "y", "x"),
                                             c_coords=list(img.coords["c"].values),
                                             transformations=get_transformation(img, get_all=True))
    cache.mkdir(parents=True, exist_ok=True)
    sdata.write(path)
    return path


def cohort(path: Path):
    """50 slides (10 copies × 5 sections) over lazy, zarr-backed images."""
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    base = sd.read_zarr(path)
    table = base.tables["table"]
    images, shapes, tables = {}, {}, []
    for i in range(N_COPIES):
        for s in SECTIONS:
            lib = f"{s}_{i}"
            cs = {lib: Identity()}
            img = base.images[f"{s}_full_image"]
            images[f"{lib}_full_image"] = Image2DModel.parse(img.data, dims=("c", "y", "x"),
                                                             c_coords=list(img.coords["c"].values), transformations=cs)
            t = table[(table.obs["region"] == s).to_numpy()]
            t = t[np.arange(t.n_obs) % 5 == i % 5].copy()
            circ = base.shapes[s].loc[t.obs["spot_id"].to_numpy()]
            shapes[lib] = ShapesModel.parse(np.c_[circ.geometry.x, circ.geometry.y], geometry=0,
                                            radius=circ["radius"].to_numpy(), index=pd.RangeIndex(t.n_obs),
                                            transformations=cs)
            t.obs_names = [f"{lib}_{k}" for k in range(t.n_obs)]
            t.obs["region"] = lib
            t.obs["spot_id"] = np.arange(t.n_obs)
            t.obs["library_id"] = lib
            t.uns = {}
            tables.append(t)
    tab = ad.concat(tables, merge="same")
    libs = [f"{s}_{i}" for i in range(N_COPIES) for s in SECTIONS]
    tab.obs["region"] = pd.Categorical(tab.obs["region"], categories=libs)
    tab.uns["spatial"] = {f"{s}_{i}": dict(table.uns["spatial"][s]) for i in range(N_COPIES) for s in SECTIONS}
    tab = TableModel.parse(tab, region=libs, region_key="region", instance_key="spot_id")
    return sd.SpatialData(images=images, shapes=shapes, tables={"table": tab})


def run(mode: str, path: Path, out: Path) -> None:
    """One timed embed of the whole cohort in this process; features to ``out`` (npz), stats to stdout."""
    import stimg as si

    si.settings.progress = False
    si.settings.verbosity = 1
    data = cohort(path)
    table = data.tables["table"]
    kw = {"cache": False, "batch_size": 64, "accelerator": "cpu", "inplace": False}
    client = cluster = None
    t0 = time.perf_counter()
    if mode == "dask":
        import dask
        from distributed import Client, LocalCluster

        # dask's statistical profiler samples every worker's stack every 10 ms: ~30 % more CPU per spot for
        # compute-bound tasks on this machine; a deployment choice, off here (see docs/scaling.md)
        dask.config.set({"distributed.worker.profile.enabled": False})
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        kw |= {"client": client, "spots_per_task": SPOTS_PER_TASK}
        worker_threads = list(client.run(lambda: __import__("torch").get_num_threads()).values())
    else:
        import torch

        if os.environ.get("STIMG_BENCH_NO_IMAGE_CACHE"):
            # read every patch window lazily, as the single-process path does for any slide larger than its
            # 2 GB image cache (real WSIs): on a shared machine the default's ~4.3 GB peak was OOM-killed
            from stimg.pp._patch_dataset import PatchDataset

            PatchDataset.__init__.__kwdefaults__["cache_bytes"] = 0
        torch.set_num_threads(int(mode[-1]))
        worker_threads = [torch.get_num_threads()]
    startup = time.perf_counter() - t0
    first = list(table.obs["region"].cat.categories[:4])  # ~150 spots: 3 tasks of ≤ 64, every worker warms up
    si.pp.embed(data, library_id=first, **({**kw, "spots_per_task": 64} if client else kw))
    torch_before = "torch" in sys.modules
    workers0 = sum(client.run(_cpu_s).values()) if client else 0.0
    mon = _PeakRSS()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    feats = si.pp.embed(data, **kw)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    mon.stop()
    workers = (sum(client.run(_cpu_s).values()) - workers0) if client else 0.0
    if client is not None:
        client.close()
        cluster.close()
    np.savez(out, feats=feats)
    print(json.dumps({"mode": mode, "n_spots": int(table.n_obs), "n_slides": int(table.obs["region"].nunique()),
                      "wall_s": wall, "startup_s": startup, "spots_per_s": table.n_obs / wall,
                      "cpu_s_driver": cpu, "cpu_s_workers": workers, "cpu_ms_per_spot": 1e3 * (cpu + workers) / table.n_obs,
                      "loadavg_1min_after": os.getloadavg()[0],
                      "driver_rss_before": mon.base, "driver_rss_peak": mon.peak,
                      "driver_peak_increase": mon.peak - mon.base, "torch_threads": worker_threads,
                      "driver_imported_torch": "torch" in sys.modules, "torch_before_call": torch_before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.environ.get("STIMG_BENCH_DASK", "/work/cache/bench_dask"))
    p.add_argument("--mode", choices=["single1", "single2", "dask"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=5, help="runs in the order single1 dask single2 dask single1")
    p.add_argument("--order", help="comma-separated modes to run instead, e.g. single1,dask,single1")
    p.add_argument("--copies", type=int, default=N_COPIES, help="copies of each of the 5 sections (10: 50 slides)")
    p.add_argument("--results", default=str(HERE / "results" / "bench_dask_embed.json"), help="JSON file written")
    a = p.parse_args()
    path = prepare(Path(a.cache))
    if a.mode:
        run(a.mode, path, Path(a.out))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src"),
           "STIMG_BENCH_COPIES": str(a.copies)}
    # symmetric order (A B C B A): a load that drifts during the run affects single1 and dask equally
    order = a.order.split(",") if a.order else ("single1", "dask", "single2", "dask", "single1")[: a.runs]
    runs, feats = [], {}
    for k, mode in enumerate(order):
        out = Path(a.cache) / f"feats_{mode}_{a.copies}.npz"
        waited = _wait_for_memory(MIN_FREE_BYTES)
        load_before = os.getloadavg()[0]
        repeated = 0
        while True:  # a run killed by the kernel's OOM killer (a shared machine) is repeated, up to 3 times
            r = subprocess.run([sys.executable, __file__, "--cache", a.cache, "--mode", mode, "--out", str(out)],
                               env=env, capture_output=True, text=True, check=False)
            if r.returncode != -9 or repeated == 3:
                break
            repeated += 1
            print(f"{mode}: killed (out of memory?), retrying", flush=True)
            waited += _wait_for_memory(MIN_FREE_BYTES)
        if r.returncode:
            sys.exit(f"{mode} failed ({r.returncode}):\n{r.stderr[-4000:]}")
        runs.append({"order": k, **json.loads(r.stdout.strip().splitlines()[-1]), "loadavg_1min_before": load_before,
                     "killed_and_repeated": repeated, "waited_for_memory_s": waited})
        with np.load(out) as z:
            f = z["feats"]
        if mode in feats and not np.array_equal(f, feats[mode]):
            sys.exit(f"{mode}: features differ between repeats")
        feats[mode] = f
        print(mode, runs[-1], flush=True)
    import dask
    import distributed
    import spatialdata as sd
    import torch

    def mean(mode: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs if r["mode"] == mode]))

    rate = {m: mean(m, "spots_per_s") for m in feats}
    base = sd.read_zarr(path)
    img_bytes = {s: int(np.prod(base.images[f"{s}_full_image"].shape)) for s in SECTIONS}  # uint8
    dask_runs = [r for r in runs if r["mode"] == "dask"]
    res = {
        "n_slides": dask_runs[0]["n_slides"], "n_spots": dask_runs[0]["n_spots"], "encoder": "efficientnet_lite0",
        "patch": "112 µm → 224 px", "batch_size": 64, "spots_per_task": SPOTS_PER_TASK,
        "cluster": "LocalCluster(2 workers × 1 thread, processes), distributed.worker.profile.enabled=False",
        "order": list(order), "runs": runs,
        "single_process_image_cache": "off (every window read lazily)" if os.environ.get("STIMG_BENCH_NO_IMAGE_CACHE")
        else "default (slides up to 2 GB in all read whole)",
        "mean_spots_per_s": rate,
        "throughput_ratio_dask_over_single1": rate["dask"] / rate["single1"],
        "throughput_ratio_dask_over_single2": rate["dask"] / rate["single2"] if "single2" in rate else None,
        "mean_cpu_ms_per_spot": {m: mean(m, "cpu_ms_per_spot") for m in feats},
        "loadavg_1min_during": [r["loadavg_1min_before"] for r in runs] + [runs[-1]["loadavg_1min_after"]],
        "slide_image_bytes": img_bytes,
        "driver_peak_increase_dask_max": max(r["driver_peak_increase"] for r in dask_runs),
        "driver_peak_increase_over_smallest_slide_image":
            max(r["driver_peak_increase"] for r in dask_runs) / min(img_bytes.values()),
        "features_identical_dask_vs_single1": bool(np.array_equal(feats["dask"], feats["single1"])),
        "max_abs_diff_dask_vs_single1": float(np.abs(feats["dask"] - feats["single1"]).max()),
        "max_abs_diff_dask_vs_single2":
            float(np.abs(feats["dask"] - feats["single2"]).max()) if "single2" in feats else None,
        "cpu_count": os.cpu_count(), "loadavg_after": list(os.getloadavg()), "torch": torch.__version__,
        "dask": dask.__version__, "distributed": distributed.__version__, "platform": platform.platform(),
    }
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
