from __future__ import annotations

import os

import numpy as np
import pytest

from stimg.cli import main


def test_help_documents_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--sections", "--test-section", "--encoder", "--n-genes", "--members", "--budgets", "--out",
                "--no-progress", "--patch-um", "--context-um"):
        assert opt in out
    assert main([]) == 2  # no command: a usage error (issue 14)
    for cmd, opts in (("train", ("--sections", "--data", "--out", "--model", "--no-calibrate")),
                      ("predict", ("--model", "--out", "--mpp", "--genes"))):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert all(o in text for o in opts)


def test_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--sections", "C6", "--test-section", "C6", "--out", str(tmp_path)]) == 2
    assert "training section" in capsys.readouterr().err
    assert main(["demo", "--sections", "C5", "C6", "--out", str(tmp_path)]) == 2  # one training section
    assert "≥ 2 training sections" in capsys.readouterr().err
    assert main(["demo", "--members", "1", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--context-um", "-1", "--out", str(tmp_path)]) == 2
    assert "--context-um must be ≥ 0" in capsys.readouterr().err
    (tmp_path / "m.stimg").write_bytes(b"x")
    assert main(["train", "--out", str(tmp_path / "m.stimg")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.real
@pytest.mark.slow
def test_train_then_predict_a_real_slide(datadir, tmp_path, capsys):
    """`stimg train` on two HER2ST sections, `stimg predict` on a real SVS slide without ST."""
    import spatialdata as sd

    model = tmp_path / "her2st.stimg"
    assert main(["train", "--sections", "C5", "C6", "--n-genes", "4", "--members", "2", "--patch-px", "64",
                 "--out", str(model), "--no-progress", "--quiet", "--datadir", str(datadir)]) == 0
    assert "calibrated (cross-conformal)" in capsys.readouterr().out
    import stimg as si

    ens = si.models.load_model(model)
    genes = list(ens.genes_)
    prov = ens.members[0].embedding_provenance_
    assert prov["encoder"] == "efficientnet_lite0" and prov["patch_px"] == 64 and prov["patch_um"] == 112.0
    assert ens.calibration_ is not None

    tcga = datadir / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"  # no µm/px in its metadata: a clear error
    assert main(["predict", str(tcga), "--model", str(model), "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "--mpp" in capsys.readouterr().err

    out = tmp_path / "pred"
    slide = datadir / "wsi" / "CMU-1-Small-Region.svs"
    assert main(["predict", str(slide), "--model", str(model), "--out", str(out), "--no-progress", "--quiet"]) == 0
    tiles = sd.read_zarr(out / "tiles.zarr")
    table = tiles.tables["table"]
    assert list(table.var_names) == genes  # genes as trained
    params = table.uns["tile_image"]["params"]
    assert 0 < table.n_obs < params["n_tiles_grid"] and (table.obs["tissue_coverage"] >= 0.5).all()  # tissue only
    for layer in ("si_pred", "si_aleatoric", "si_epistemic"):
        assert np.isfinite(np.asarray(table.layers[layer])).all()
    assert np.isfinite(table.obs["si_uncertainty"]).all()
    assert tiles.attrs["stimg_wsi"]["mpp"] == pytest.approx(0.499)
    assert sorted(p.stem for p in (out / "heatmaps").glob("*.png")) == sorted([*genes, "si_uncertainty"])


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("STIMG_RUN_DEMO"), reason="set STIMG_RUN_DEMO=1 (or run .ci/run_demo.sh)")
def test_demo_end_to_end_reduced(datadir, tmp_path, capsys):
    """Three real sections, 64-px patches, 5 genes, 2 members, 1 seed: the full path of `stimg demo`."""
    rc = main(["demo", "--sections", "C4", "C5", "C6", "--n-genes", "5", "--patch-px", "64", "--members", "2",
               "--seeds", "1", "--out", str(tmp_path), "--no-progress", "--quiet", "--n-show", "2",
               "--datadir", str(datadir)])
    assert rc == 0
    out = capsys.readouterr().out
    for line in ("mean PCC over genes", "coverage of C6 counts", "scrl", "wall time"):
        assert line in out
    for f in ("metrics.csv", "coverage.csv", "per_gene.csv", "sampling.csv", "report.md", "demo_C6_spatial.png",
              "demo_C6_coverage.png", "demo_budget_curve.png", "demo_sampled_spots.png"):
        assert (tmp_path / f).stat().st_size > 100, f
    assert "demo_C6_spatial.png" in (tmp_path / "report.md").read_text()
    assert list((tmp_path / "feature_cache").glob("*.npz"))


@pytest.mark.filterwarnings("ignore:zarr v3 autosharding")
def test_train_from_files(tmp_path, capsys):
    """`stimg train --data` reads a SpatialData .zarr or an AnnData .h5ad with counts and images."""
    import stimg as si

    sdata = si.datasets.synthetic(48, 6, n_sections=2, mpp=4.0)
    sdata.write(tmp_path / "syn.zarr")
    assert main(["train", "--data", str(tmp_path / "syn.zarr"), "--model", "ridge", "--genes", "gene_0", "gene_1", "gene_2", "gene_3", "--patch-px",
                 "32", "--min-tissue", "0", "--out", str(tmp_path / "ridge.stimg"), "--no-progress", "--quiet"]) == 0
    ridge = si.models.load_model(tmp_path / "ridge.stimg")
    assert type(ridge).__name__ == "RidgeRegressor" and len(ridge.var_names_) == 4
    assert ridge.embedding_provenance_["patch_px"] == 32
    adata = si.datasets.synthetic(48, 6, n_sections=2, mpp=4.0, as_anndata=True)
    adata.write_h5ad(tmp_path / "syn.h5ad")
    assert main(["train", "--data", str(tmp_path / "syn.h5ad"), "--genes", "gene_0", "gene_1", "--members", "2",
                 "--no-calibrate", "--patch-px", "32", "--min-tissue", "0", "--out", str(tmp_path / "nb.stimg"),
                 "--no-progress", "--quiet"]) == 0
    assert "uncalibrated" in capsys.readouterr().out
    assert si.models.load_model(tmp_path / "nb.stimg").genes_ == ["gene_0", "gene_1"]
