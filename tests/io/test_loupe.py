"""Loupe Browser CSV in and out: round trip, real-world quirks, errors that name the problem."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import stimg as si
from stimg._utils import StimgWarning
from stimg.io import LoupeFormatError


@pytest.fixture
def adata():
    ad = si.datasets.synthetic(30, 5, image=False, as_anndata=True)
    ad.obs_names = [f"AAAC{i:04d}-1" for i in range(ad.n_obs)]  # Visium-like barcodes
    labels = np.array(["invasive cancer", "connective tissue", 'in situ, "ductal"', "adipös", " spaced "] * 6,
                      dtype=object)
    labels[[3, 7, 11]] = None  # unlabelled
    ad.obs["pathologist"] = pd.Categorical(labels)
    ad.obs["other"] = np.arange(ad.n_obs)
    return ad


def test_write_read_round_trip_is_identical(adata, tmp_path):
    path = si.io.write_loupe(adata, tmp_path / "labels.csv", "pathologist")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("Barcode,pathologist\n") and text.count("\n") == 1 + 27
    back = si.io.read_loupe(adata, path, key_added="back", inplace=False)
    orig = adata.obs["pathologist"]
    assert (back.isna() == orig.isna()).all()
    assert (back.dropna().astype(str) == orig.dropna().astype(str)).all()
    # into a fresh copy of the table: identical column
    fresh = adata.copy()
    del fresh.obs["pathologist"]
    si.io.read_loupe(fresh, path)  # key from the CSV header
    assert (fresh.obs["pathologist"].astype(object).fillna("NA") == orig.astype(object).fillna("NA")).all()
    np.testing.assert_array_equal(fresh.obs["other"], adata.obs["other"])


def test_real_loupe_quirks_bom_crlf_header_case_extra_columns(adata, tmp_path):
    bcs = adata.obs_names
    text = ("\ufeffBARCODE,Pathologist Annotations,Notes\r\n"
            f"{bcs[0]},invasive cancer,first\r\n"
            "\r\n"
            f'{bcs[1]},"connective tissue","two, words"\r\n'
            f"{bcs[2]},,unassigned in Loupe\r\n")
    p = tmp_path / "loupe.csv"
    p.write_bytes(text.encode("utf-8"))
    out = si.io.read_loupe(adata, p, key_added="ann", column="pathologist annotations", inplace=False)
    assert out.iloc[0] == "invasive cancer" and out.iloc[1] == "connective tissue" and out.iloc[2:].isna().all()
    with pytest.raises(LoupeFormatError, match=r"2 category columns \['Pathologist Annotations', 'Notes'\]"):
        si.io.read_loupe(adata, p, key_added="ann")
    (tmp_path / "tab.tsv").write_text(f"barcode\tlabel\n{bcs[0]}\tx\n")
    assert si.io.read_loupe(adata, tmp_path / "tab.tsv", key_added="t", inplace=False).iloc[0] == "x"


def test_merge_keeps_other_spots_and_columns_and_applies_corrections(adata, tmp_path):
    bcs = adata.obs_names
    (tmp_path / "r2.csv").write_text(f"Barcode,pathologist\n{bcs[3]},adipös\n{bcs[0]},connective tissue\n")
    before = adata.obs.copy()
    si.io.read_loupe(adata, tmp_path / "r2.csv")
    after = adata.obs
    assert after.loc[bcs[3], "pathologist"] == "adipös"  # newly labelled
    assert after.loc[bcs[0], "pathologist"] == "connective tissue"  # corrected
    rest = ~bcs.isin([bcs[0], bcs[3]])
    pd.testing.assert_series_equal(after.loc[rest, "pathologist"].astype(object),
                                   before.loc[rest, "pathologist"].astype(object))
    pd.testing.assert_frame_equal(after.drop(columns="pathologist"), before.drop(columns="pathologist"))


def test_unknown_barcodes_and_labels_are_reported_by_name(adata, tmp_path):
    bcs = adata.obs_names
    p = tmp_path / "bad.csv"
    p.write_text(f"Barcode,pathologist\n{bcs[0]},invasive cancer\nTTTT-1,adipös\nGGGG-1,adipös\n")
    before = adata.obs.copy()
    with pytest.raises(KeyError, match=r"2 barcodes .*'TTTT-1', 'GGGG-1'"):
        si.io.read_loupe(adata, p)
    pd.testing.assert_frame_equal(adata.obs, before)  # nothing written
    with pytest.warns(StimgWarning, match="TTTT-1"):
        si.io.read_loupe(adata, p, on_unknown="warn")
    assert adata.obs.loc[bcs[0], "pathologist"] == "invasive cancer"
    q = tmp_path / "typo.csv"
    q.write_text(f"Barcode,pathologist\n{bcs[3]},Invasive Cancer\n")
    with pytest.warns(StimgWarning, match=r"not classes of obs\['pathologist'\] yet: \['Invasive Cancer'\]"):
        si.io.read_loupe(adata, q)  # a class first met in a later round (or a typo): added, reported
    assert "Invasive Cancer" in adata.obs["pathologist"].cat.categories
    fixed = ["invasive cancer", "connective tissue", "adipös"]
    with pytest.raises(ValueError, match=r"outside classes=: \['Invasive Cancer'\]"):
        si.io.read_loupe(adata, q, key_added="strict", classes=fixed)
    assert "strict" not in adata.obs
    with pytest.warns(StimgWarning, match="Invasive Cancer"):
        si.io.read_loupe(adata, q, key_added="strict", classes=fixed, on_unknown="warn")
    assert list(adata.obs["strict"].cat.categories) == [*fixed, "Invasive Cancer"]


@pytest.mark.parametrize(("content", "match"), [
    ("Barcode,label\nAAAC0000-1,a\nAAAC0001-1,b,extra\n", "line 3: 3 fields"),
    ("Barcode,label\nAAAC0000-1,a\nAAAC0000-1,b\n", "line 3: barcode 'AAAC0000-1' is labelled 'b' here but 'a' on line 2"),
    ("Spot,label\nAAAC0000-1,a\n", "line 1: no 'Barcode' column"),
    ("Barcode\nAAAC0000-1\n", "0 category columns"),
    ("", "is empty"),
    ('Barcode,label\nAAAC0000-1,"unterminated\n', "line"),
    ("Barcode,label\n,a\n", "line 2: empty barcode"),
])
def test_malformed_csv_names_the_line(adata, tmp_path, content, match):
    p = tmp_path / "m.csv"
    p.write_text(content)
    with pytest.raises(LoupeFormatError, match=match):
        si.io.read_loupe(adata, p, key_added="x")
    assert "x" not in adata.obs


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicate_spot_names_are_refused(adata, tmp_path):
    import anndata as ad

    dup = ad.concat([adata, adata])  # same barcodes twice (two sections, no index_unique)
    with pytest.warns(StimgWarning, match="more than once"), pytest.raises(ValueError, match="barcode_key="):
        si.io.write_loupe(dup, tmp_path / "d.csv", "pathologist")
    assert not (tmp_path / "d.csv").exists()


def test_non_utf8_and_missing_files(adata, tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("Barcode,label\nAAAC0000-1,adip\xf6s\n".encode("latin-1"))
    with pytest.raises(LoupeFormatError, match="line 2: not UTF-8"):
        si.io.read_loupe(adata, p, key_added="x")
    with pytest.raises(FileNotFoundError):
        si.io.read_loupe(adata, tmp_path / "nope.csv")


def test_write_suggestions_subset_and_overwrite(adata, tmp_path):
    adata.obs["si_to_label"] = np.arange(adata.n_obs) < 4
    p = si.io.write_loupe(adata, tmp_path / "todo.csv", "si_to_label")
    df = pd.read_csv(p)
    assert list(df.columns) == ["Barcode", "si_to_label"] and len(df) == 4
    assert (df["si_to_label"] == "si_to_label").all()
    p2 = si.io.write_loupe(adata, tmp_path / "prefill.csv", "pathologist", subset="si_to_label",
                           column="Pathologist Annotations")
    df2 = pd.read_csv(p2)
    assert list(df2.columns) == ["Barcode", "Pathologist Annotations"] and len(df2) == 3  # spot 3 is unlabelled
    with pytest.raises(FileExistsError, match="overwrite=True"):
        si.io.write_loupe(adata, p, "si_to_label")
    with pytest.raises(KeyError, match="nope"):
        si.io.write_loupe(adata, tmp_path / "n.csv", "nope")
    assert not (tmp_path / "n.csv").exists()
    adata.obs["loupe_barcode"] = [f"B{i}" for i in range(adata.n_obs)]
    p3 = si.io.write_loupe(adata, tmp_path / "bk.csv", "pathologist", barcode_key="loupe_barcode")
    assert pd.read_csv(p3)["Barcode"].iloc[0] == "B0"


@pytest.mark.real
def test_her2st_a1_pathologist_labels_round_trip(datadir, tmp_path):
    a1 = si.datasets.her2st("A1", image=False, as_anndata=True)
    path = si.io.write_loupe(a1, tmp_path / "a1.csv", "pathologist_label")
    back = si.io.read_loupe(a1, path, key_added="from_loupe", inplace=False)
    orig = a1.obs["pathologist_label"].astype(object)
    assert int(back.notna().sum()) == int(orig.notna().sum()) > 300
    assert (back.astype(object).fillna("NA") == orig.fillna("NA")).all()
