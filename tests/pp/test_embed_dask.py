"""si.pp.embed through a dask.distributed cluster: one task per chunk of spots, identical features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import stimg as si

distributed = pytest.importorskip("distributed")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


def test_features_identical_to_one_process_across_tasks_and_sections(client):
    sdata = si.datasets.synthetic(30, 4, mpp=4.0, n_sections=3)
    enc = _tiny()
    kw = {"patch_px": 32, "batch_size": 8, "cache": False, "progress": False}
    want = si.pp.embed(sdata, enc, inplace=False, **kw)
    # 24-spot tasks (3 batches) cut across the 30-spot sections: 4 tasks
    si.pp.embed(sdata, enc, client=client, spots_per_task=20, key_added="X_dask", **kw)
    table = sdata["table"]
    np.testing.assert_array_equal(table.obsm["X_dask"], want)
    assert table.uns["X_dask"]["params"]["device"].startswith("dask")


def test_lazy_zarr_images_and_cache(client, tmp_path):
    import spatialdata as sd

    si.datasets.synthetic(20, 4, mpp=4.0, n_sections=2).write(tmp_path / "s.zarr")
    sdata = sd.read_zarr(tmp_path / "s.zarr")  # images on disk: only references travel to the workers
    assert not isinstance(sdata.images["S0_full_image"].data, np.ndarray)
    enc = _tiny()
    want = si.pp.embed(sdata, enc, patch_px=32, batch_size=8, inplace=False, cache=False, progress=False)
    si.pp.embed.clear_cache()
    kw = {"patch_px": 32, "batch_size": 8, "client": client, "progress": False, "key_added": "X_tiny"}
    si.pp.embed(sdata, enc, **kw)
    table = sdata["table"]
    np.testing.assert_array_equal(table.obsm["X_tiny"], want)
    si.pp.embed(sdata, enc, **kw)  # all from the cache: nothing is sent to the cluster
    assert table.uns["X_tiny"]["params"]["n_from_cache"] == table.n_obs


def test_bad_client_and_task_size(client):
    sdata = si.datasets.synthetic(10, 4, mpp=4.0)
    with pytest.raises(TypeError, match="dask.distributed Client"):
        si.pp.embed(sdata, _tiny(), patch_px=32, client=object(), cache=False)
    with pytest.raises(ValueError, match="spots_per_task must be ≥ 1"):
        si.pp.embed(sdata, _tiny(), patch_px=32, client=client, spots_per_task=0, cache=False)
    assert not any(k.startswith("X_s") and k != "X_synthetic" for k in sdata["table"].obsm)


def test_task_reads_only_the_chunks_its_windows_touch(tmp_path):
    """A task reads each image chunk its patches touch once, no other chunk, and cuts the same crops."""
    import dataclasses

    import dask
    import dask.array as da

    from stimg._spatial import Section
    from stimg.pp._distributed import _prefetch
    from stimg.pp._patch_dataset import PatchDataset

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, 400, 500), dtype=np.uint8)
    da.from_array(img, chunks=(3, 100, 100)).to_zarr(str(tmp_path / "img.zarr"))
    reads = []

    def record(block, block_info=None):
        reads.append(tuple(block_info[0]["chunk-location"][1:]))
        return block

    lazy = da.from_zarr(str(tmp_path / "img.zarr")).map_blocks(record, dtype=np.uint8)
    # 30 px windows: inside chunk (0, 0); across chunks (1..2, 1..2); half off the image in (0, 4)
    xy = np.array([[20.0, 20.0], [200.0, 200.0], [495.0, 50.0]])
    section = Section("s", np.arange(3), xy, lazy, None, 1.0, 10.0)
    with dask.config.set(scheduler="synchronous"):
        fetched = dataclasses.replace(section, image=_prefetch(section, patch_um=30))
    assert sorted(reads) == [(0, 0), (0, 4), (1, 1), (1, 2), (2, 1), (2, 2)]
    names = np.array(["a", "b", "c"])
    ds = PatchDataset([fetched], names, patch_um=30, patch_px=30)
    ref = PatchDataset([dataclasses.replace(section, image=img)], names, patch_um=30, patch_px=30)
    for i in range(3):
        np.testing.assert_array_equal(ds.crop(i), ref.crop(i))
    assert len(reads) == 6  # cutting the patches read nothing more


def _lazy_slide(tmp_path, img):
    """A zarr-backed SpatialData holding ``img`` (y, x, 3) as a 2-level pyramid: the pixels stay on disk."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    elem = Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                              scale_factors=[2], chunks=(3, 256, 256))
    sd.SpatialData(images={"wsi": elem}).write(tmp_path / "wsi.zarr")
    return sd.read_zarr(tmp_path / "wsi.zarr")


def test_tile_image_through_the_cluster_equals_one_process(client, tmp_path):
    img = np.full((900, 1300, 3), 235, np.uint8)
    rng = np.random.default_rng(0)
    img[150:750, 200:1000] = np.clip(rng.normal((170, 80, 150), 20, (600, 800, 3)), 0, 255).astype(np.uint8)
    sdata = _lazy_slide(tmp_path, img)
    want = si.pp.tile_image(sdata, 100, mpp=1.0, working_mpp=2.0)
    with distributed.get_task_stream(client) as ts:
        got = si.pp.tile_image(sdata, 100, mpp=1.0, working_mpp=2.0, client=client)
    assert sum(str(t["key"]).startswith("_in_worker") for t in ts.data) == 1  # one task, in a worker
    a, b = want.tables["table"], got.tables["table"]
    assert 20 < a.n_obs < 9 * 13  # background tiles dropped
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    np.testing.assert_array_equal(b.obs["tissue_coverage"], a.obs["tissue_coverage"])
    assert b.uns["tile_image"]["params"] == a.uns["tile_image"]["params"]
    assert got.images["wsi"] is sdata.images["wsi"]  # a reference: the driver never read the pixels
    # the tiles embed through the same cluster
    feats = si.pp.embed(got, _tiny(), patch_um=100, patch_px=32, batch_size=8, client=client, inplace=False,
                        cache=False, progress=False)
    np.testing.assert_array_equal(feats, si.pp.embed(got, _tiny(), patch_um=100, patch_px=32, batch_size=8,
                                                     inplace=False, cache=False, progress=False))


def test_tile_image_errors_leave_the_input_unchanged(client, tmp_path):
    sdata = _lazy_slide(tmp_path, np.full((400, 500, 3), 240, np.uint8))  # background only
    before = (set(sdata.images), set(sdata.shapes), set(sdata.tables))
    with pytest.raises(ValueError, match="No tile has"):  # raised after the worker's mask came back
        si.pp.tile_image(sdata, 100, mpp=1.0, working_mpp=2.0, client=client)
    with pytest.raises(TypeError, match="dask.distributed Client"):
        si.pp.tile_image(sdata, 100, mpp=1.0, client=object())
    assert (set(sdata.images), set(sdata.shapes), set(sdata.tables)) == before


def test_task_malloc_scoped_to_running_tasks(monkeypatch):
    """Under the Nanny's fixed MALLOC_TRIM_THRESHOLD_, tasks run with glibc's roomy thresholds, restored after."""
    from stimg.pp import _distributed as dist

    class LibC:
        def __init__(self):
            self.calls = []

        def mallopt(self, param, value):
            self.calls.append((param, value))

        def malloc_trim(self, pad):
            self.calls.append(("trim", pad))

    lib = LibC()
    monkeypatch.setattr(dist, "_libc", lambda: lib)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dist._task_malloc():
        pass
    assert lib.calls == []  # a default process: glibc's dynamic thresholds are left alone
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with dist._task_malloc(), dist._task_malloc():  # two tasks of one worker overlap: set once, restored once
        assert lib.calls == [(-3, 32 * 2**20), (-1, 64 * 2**20)]
    assert lib.calls[2:] == [(-1, 65536), (-3, 128 * 2**10), ("trim", 0)]


def test_whole_slide_images_travel_to_the_workers(client, tmp_path):
    """read_wsi's lazy levels pickle as their file path (open handles cannot): tiles and features as in one process."""
    import tifffile

    rng = np.random.default_rng(1)
    img = np.full((768, 1024, 3), 235, np.uint8)
    img[100:600, 200:900] = rng.normal((170, 80, 150), 20, (500, 700, 3)).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")  # 0.5 µm/px
    slide = si.io.read_wsi(tmp_path / "s.tif")
    want = si.pp.tile_image(slide, 64, working_mpp=1.0)
    got = si.pp.tile_image(slide, 64, working_mpp=1.0, client=client)
    np.testing.assert_array_equal(got.tables["table"].obs["tissue_coverage"], want.tables["table"].obs["tissue_coverage"])
    kw = {"patch_um": 64, "patch_px": 32, "batch_size": 8, "inplace": False, "cache": False, "progress": False}
    np.testing.assert_array_equal(si.pp.embed(got, _tiny(), client=client, spots_per_task=16, **kw),
                                  si.pp.embed(want, _tiny(), **kw))
