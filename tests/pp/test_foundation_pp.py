import numpy as np
import pytest

import stimg as si
from stimg._spatial import sections


def test_tissue_coverage_c2(c2_sdata):
    table = c2_sdata.tables["table"]
    cov = si.pp.tissue_coverage(c2_sdata, inplace=False)
    assert "tissue_coverage" not in table.obs  # inplace=False writes nothing
    assert (cov >= 0.5).mean() >= 0.9
    # background far from the tissue has no coverage
    from stimg.pp._tissue import _coverage

    mask, step = si.pp.tissue_mask(c2_sdata)
    assert _coverage(mask, np.array([[5.0, 5.0]]), 5.0, square=False)[0] == 0.0


def test_tissue_coverage_writes_and_filters():
    ad = si.datasets.synthetic(64, 5, as_anndata=True)  # 8 × 8 grid, 200 px pitch, 1 µm/px
    img = ad.uns["spatial"]["S0"]["images"]["hires"]
    img[:, :500] = 245  # glass under the first two grid columns
    blank = ad.obs["array_x"].to_numpy() <= 1
    cov = si.pp.tissue_coverage(ad, inplace=False)
    assert (cov[blank] < 0.05).all() and cov[~blank].median() > 0.9
    si.pp.tissue_coverage(ad, min_coverage=0.7)
    assert ad.n_obs < 64 - 15 and (ad.obs["array_x"] > 1).all()
    assert (ad.obs["tissue_coverage"] >= 0.7).all()
    assert ad.uns["tissue_coverage"]["params"]["min_coverage"] == 0.7


def test_tissue_coverage_failure_leaves_object_unchanged():
    ad = si.datasets.synthetic(16, 5, as_anndata=True)
    before = ad.obs.copy()
    with pytest.raises(ValueError, match="min_coverage"):
        si.pp.tissue_coverage(ad, min_coverage=1.5)
    ad.uns["spatial"]["S0"]["images"]["hires"][:] = 250  # no tissue anywhere
    with pytest.raises(ValueError, match="No spot has tissue coverage"), pytest.warns(UserWarning, match="No tissue"):
        si.pp.tissue_coverage(ad, min_coverage=0.7)
    assert ad.obs.equals(before) and "tissue_coverage" not in ad.uns


def test_patch_contains_spot_pixel(c2_sdata):
    ds = si.pp.extract_patches(c2_sdata)
    assert len(ds) == c2_sdata.tables["table"].n_obs
    sec = sections(c2_sdata)[0]
    assert ds.window_px[0] == round(112 / sec.mpp)
    img = np.asarray(c2_sdata.images["C2_full_image"].data[:, :, :])
    for i in (0, 50, 120):
        x0, y0, w = ds.window(i)
        cx, cy = np.rint(ds.centers[i]).astype(int)
        assert x0 <= cx < x0 + w and y0 <= cy < y0 + w
        crop = ds.crop(i)
        assert np.array_equal(crop[cy - y0, cx - x0], img[:, cy, cx])
        assert ds[i].shape == (3, 224, 224) and str(ds[i].dtype) == "torch.uint8"


def test_patches_pad_at_border_and_work_with_dataloader():
    import torch

    sd = si.datasets.synthetic(9, 4, mpp=1.0, pitch_um=100)
    ds = si.pp.extract_patches(sd, patch_um=300, patch_px=64, pad_value=7)
    crop = ds.crop(0)  # first spot sits 100 px from the corner: a 300 px window reaches past it
    assert crop.shape == (300, 300, 3) and (crop[0, 0] == 7).all()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch.shape == (4, 3, 64, 64)


def test_patches_same_physical_size_across_resolutions():
    a = si.datasets.synthetic(9, 4, mpp=1.0)
    b = si.datasets.synthetic(9, 4, mpp=0.5)
    wa = si.pp.extract_patches(a, patch_um=112).window_px[0]
    wb = si.pp.extract_patches(b, patch_um=112).window_px[0]
    assert wa == 112 and wb == 224


def test_extract_patches_errors():
    sd = si.datasets.synthetic(9, 4)
    with pytest.raises(ValueError, match="patch_um"):
        si.pp.extract_patches(sd, patch_um=0)
    with pytest.raises(KeyError, match="Available"):
        si.pp.extract_patches(sd, library_id="nope")
    with pytest.raises(KeyError, match="sdata.tables"):
        si.pp.extract_patches(sd, table_key="other")
    ad = si.datasets.synthetic(9, 4, as_anndata=True)
    ad.obsm["spatial"] = ad.obsm["spatial"] + 1e6
    with pytest.raises(ValueError, match="outside"):
        si.pp.extract_patches(ad)


def test_stain_normalize_moves_towards_reference(datadir):
    sd = si.datasets.her2st(["C2", "C3"])
    tf = si.pp.stain_normalize(sd, "macenko", reference="C3", library_id="C2", inplace=False)
    ref = tf["C2"].target["stains"]
    raw = si.pp.extract_patches(sd, library_id="C2")
    norm = si.pp.extract_patches(sd, library_id="C2", stain=tf)
    idx = range(0, len(raw), 12)
    a = np.concatenate([raw.patch(i) for i in idx])
    b = np.concatenate([norm.patch(i) for i in idx])
    before = np.linalg.norm(si.pp.stain_vectors(a) - ref)
    after = np.linalg.norm(si.pp.stain_vectors(b) - ref)
    assert after < 0.6 * before
    # whole-image normalisation is lazy and block-wise: new elements, original untouched
    si.pp.stain_normalize(sd, "reinhard", reference="C3")
    assert {"C2_full_image_reinhard", "C3_full_image_reinhard"} <= set(sd.images)
    blk = np.asarray(sd.images["C2_full_image_reinhard"].data[:, 6000:6100, 3000:3100])
    assert blk.shape == (3, 100, 100) and blk.dtype == np.uint8
    with pytest.raises(KeyError, match="exists already"):
        si.pp.stain_normalize(sd, "reinhard", reference="C3")


def test_stain_methods_synthetic():
    rng = np.random.default_rng(0)
    he = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    conc = rng.gamma(2.0, 0.4, size=(2, 64 * 64))
    rgb = np.clip(240 * np.exp(-(he @ conc)).T, 0, 255).astype(np.uint8).reshape(64, 64, 3)
    for method in ("macenko", "vahadane"):
        v = si.pp.stain_vectors(rgb, method)
        cos = np.abs((v / np.linalg.norm(v, axis=0)).T @ (he / np.linalg.norm(he, axis=0)))
        assert cos.max(1).min() > 0.9, method
    with pytest.raises(ValueError, match="method"):
        si.pp.stain_normalize(si.datasets.synthetic(9, 4), "nope")
    with pytest.raises(ValueError, match="Too few stained"):
        si.pp.stain_vectors(np.full((32, 32, 3), 250, np.uint8))
    ad = si.datasets.synthetic(9, 4, as_anndata=True)
    with pytest.raises(TypeError, match="SpatialData"):
        si.pp.stain_normalize(ad, "macenko")


def test_select_genes_on_training_sections_only():
    ad = si.datasets.synthetic(100, 30, n_sections=2, image=False, as_anndata=True)
    # make gene_0 hugely variable in S1 only: must not be chosen from S0
    s1 = (ad.obs["library_id"] == "S1").to_numpy()
    X = ad.X.toarray()
    X[s1, 0] = np.where(np.arange(s1.sum()) % 2 == 0, 0, 2000)
    X[~s1, 0] = 3
    ad.X = X
    genes = si.pp.select_genes(ad, 5, subset=["S0"], inplace=False)
    assert "gene_0" not in genes
    assert "gene_0" in si.pp.select_genes(ad, 5, subset=["S1"], inplace=False)
    si.pp.select_genes(ad, 5, subset=["S0"], method="hvg")
    assert ad.var["si_target"].sum() == 5 and ad.uns["si_target"]["params"]["method"] == "hvg"
    with pytest.raises(KeyError, match="not in the table"):
        si.pp.select_genes(ad, 5, subset=["S7"])
    with pytest.raises(ValueError, match="empty"):
        si.pp.select_genes(ad, 5, subset=np.zeros(ad.n_obs, bool))
    with pytest.raises(ValueError, match="n_top"):
        si.pp.select_genes(ad, 500)


def test_in_memory_chunk_reader_matches_dask_slicing():
    import dask.array as da

    from stimg.pp._patch_dataset import _InMemoryChunks

    rng = np.random.default_rng(0)
    full = rng.integers(0, 255, (3, 300, 257), dtype=np.uint8)
    arr = da.from_array(full, chunks=(3, 64, 50))
    reader = _InMemoryChunks.from_dask(arr)
    assert reader is not None
    for _ in range(100):
        y0, x0 = rng.integers(0, 250), rng.integers(0, 200)
        h, w = rng.integers(1, 300 - y0), rng.integers(1, 257 - x0)
        np.testing.assert_array_equal(reader[:, y0:y0 + h, x0:x0 + w], full[:, y0:y0 + h, x0:x0 + w])
    # anything but plain in-memory chunks (here a lazy transform) is not read this way
    assert _InMemoryChunks.from_dask(arr + 1) is None
    assert _InMemoryChunks.from_dask(da.from_array(full, chunks=(1, 64, 50))) is None
