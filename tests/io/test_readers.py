import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import stimg as si
from stimg._spatial import sections

PUBLISHED_MPP = {"C2": 0.696, "C3": 0.669, "C4": 0.690, "C5": 0.691, "C6": 0.698}


def test_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, stimg; assert 'torch' not in sys.modules and 'scvi' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch','scvi')))[:5]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_her2st_c2_spatialdata(c2_sdata):
    sd = c2_sdata
    table = sd.tables["table"]
    assert set(sd.images) == {"C2_full_image"} and set(sd.shapes) == {"C2"}
    assert table.n_obs == 187 and table.n_vars > 10_000
    assert table.uns["spatialdata_attrs"]["region"] == ["C2"]
    assert (table.obs["library_id"] == "C2").all() and (table.obs["patient"] == "C").all()
    # raw integer counts
    x = table.X[:50].toarray()
    assert np.allclose(x, np.round(x)) and x.min() >= 0
    sec = sections(sd)[0]
    assert sec.mpp == pytest.approx(0.696, rel=1e-3)
    # 100 µm spots
    assert sec.spot_diameter_px * sec.mpp == pytest.approx(100.0, rel=1e-6)
    assert sd.images["C2_full_image"].shape == (3, 9911, 9274)


def test_her2st_anndata_multi_section(datadir):
    ad = si.datasets.her2st(["C3", "A1"], as_anndata=True)
    assert isinstance(ad, AnnData)
    assert list(ad.obs["library_id"].cat.categories) == ["C3", "A1"]
    for lib in ("C3", "A1"):
        entry = ad.uns["spatial"][lib]
        assert max(entry["images"]["hires"].shape[:2]) <= 2000
        assert {"tissue_hires_scalef", "spot_diameter_fullres", "microns_per_pixel"} <= set(entry["scalefactors"])
    # A1: low-resolution image (3.2 µm/px) with pathologist labels joined on the grid ids
    a1 = ad[ad.obs["library_id"] == "A1"]
    counts = a1.obs["pathologist_label"].value_counts()
    assert counts["invasive cancer"] > 250 and counts["connective tissue"] > 15
    secs = {s.library_id: s for s in sections(ad)}
    assert secs["A1"].mpp == pytest.approx(3.2 * 2138 / 2000, rel=0.02)  # hires downsampled 2138 → 2000 px


def test_her2st_masks_a1_thumbnail(datadir):
    sd = si.datasets.her2st("A1")
    img = np.asarray(sd.images["A1_full_image"].data[:, :561, 1480:])
    assert img.max() == 0


@pytest.mark.parametrize("section", list(PUBLISHED_MPP))
def test_mpp_estimated_from_pitch_matches_published(datadir, section):
    root = datadir / "her2st"
    ad = si.io.read_legacy_st(root / f"counts/{section}.tsv.gz", root / f"spots/{section}_selection.tsv", as_anndata=True)
    est = ad.uns["spatial"]["section"]["scalefactors"]["microns_per_pixel"]
    assert est == pytest.approx(PUBLISHED_MPP[section], rel=0.04)


def test_her2st_knows_36_sections_and_reads_all_local(datadir):
    assert len(si.datasets.HER2ST_SECTIONS) == 36
    local = si.datasets.available_sections()
    assert len(local) >= 30 and "A2" not in local
    ad = si.datasets.her2st(local, image=False, as_anndata=True, extras=False)
    assert set(ad.obs["library_id"].cat.categories) == set(local)
    assert ad.uns["spatial"]["B1"]["images"] == {}
    assert ad.n_obs > 10_000


def test_her2st_errors(datadir, tmp_path):
    with pytest.raises(ValueError, match="Unknown HER2ST section"):
        si.datasets.her2st("Z9")
    with pytest.raises(ValueError, match="No section"):
        si.datasets.her2st([])
    si.settings.datadir = tmp_path  # empty folder, and the sc reference has no download
    with pytest.raises(FileNotFoundError, match="STIMG_DATA_DIR"):
        si.datasets.her2st_sc_reference()


def test_fetch_reports_failed_download(tmp_path, monkeypatch):
    import pooch

    from stimg.datasets._fetch import fetch

    def boom(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(pooch, "retrieve", boom)
    si.settings.datadir = tmp_path
    with pytest.raises(FileNotFoundError, match="downloading it from https://example.org/x.tsv failed"):
        fetch("her2st/x.tsv", "https://example.org/x.tsv", None)


def test_sc_reference(datadir):
    ref = si.datasets.her2st_sc_reference()
    assert ref.shape == (1564, 29733)
    assert ref.obs["celltype_major"].nunique() == 9


def _toy(n=6):
    ids = [f"{x}x{y}" for x, y in zip(range(1, n + 1), [2] * n, strict=True)]
    counts = pd.DataFrame(np.arange(n * 3).reshape(n, 3), index=ids, columns=["A", "B", "C"])
    spots = pd.DataFrame({"x": range(1, n + 1), "y": [2] * n, "pixel_x": [100.0 * i for i in range(1, n + 1)],
                          "pixel_y": [150.0] * n, "selected": 1})
    spots.loc[len(spots)] = [9, 9, 50.0, 50.0, 1]  # a spot without counts is dropped
    return counts, spots


def test_read_legacy_st_generic():
    counts, spots = _toy()
    img = np.full((400, 800, 3), 230, np.uint8)
    sd = si.io.read_legacy_st(counts, spots, img, library_id="toy")
    t = sd.tables["table"]
    assert t.n_obs == 6 and list(t.var_names) == ["A", "B", "C"]
    # pitch 100 px per grid step = 200 µm → 2 µm/px
    assert sections(sd)[0].mpp == pytest.approx(2.0)


def test_read_legacy_st_bad_input(tmp_path):
    counts, spots = _toy()
    with pytest.raises(ValueError, match="outside the"):
        si.io.read_legacy_st(counts, spots, np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(KeyError, match="pixel_x"):
        si.io.read_legacy_st(counts, spots.drop(columns="pixel_x"))
    bad = counts.astype(float)
    bad.iloc[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        si.io.read_legacy_st(bad, spots)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        si.io.read_legacy_st(tmp_path / "nope.tsv", spots)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Could not read image"):
        si.io.read_legacy_st(counts, spots, junk)
    other = counts.copy()
    other.index = [f"{i}x{i}" for i in range(50, 56)]
    with pytest.raises(ValueError, match="No spot ids are shared"):
        si.io.read_legacy_st(other, spots)
    with pytest.raises(ValueError, match="mpp must be a positive"):
        si.io.read_legacy_st(counts, spots, mpp=-1)


def test_read_visium_fixture(datadir):
    sd = si.io.read_visium(datadir / "fixtures" / "scanpy_visium_heart_subset", dataset_id="heart")
    t = sd.tables["table"]
    assert t.n_obs == 100
    sec = sections(sd)[0]
    assert sec.image_key == "heart_hires_image"
    sf = t.uns["spatial"]["heart"]["scalefactors"]
    # 55 µm spots: µm/px of the hires image = 55 / (spot diameter in hires pixels)
    assert sec.mpp == pytest.approx(55 / (sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"]), rel=1e-3)
    assert (sec.xy >= 0).all() and (sec.xy < 2000).all()


def test_synthetic():
    sd, ref = si.datasets.synthetic(50, 12, n_sections=2, reference=True, n_cells=100)
    t = sd.tables["table"]
    assert t.shape == (100, 12) and ref.shape == (100, 12)
    assert set(sd.images) == {"S0_full_image", "S1_full_image"}
    assert t.obsm["X_synthetic"].shape == (100, 32)
    with pytest.raises(ValueError):
        si.datasets.synthetic(0, 5)
