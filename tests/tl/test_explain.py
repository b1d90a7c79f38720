"""si.tl.explain / si.pl.explain: LIME over nuclei, gradient explainers, storage, errors, real HER2ST faithfulness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import stimg as si
from stimg._prediction import ExpressionPrediction
from stimg.encoders import get_encoder
from stimg.tl._explain_engine import (
    PatchSetup,
    PerturbedPatches,
    Predictor,
    deletion_check,
    equal_area_draw,
    lime,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # lightning chatter in the NB models


# ------------------------------------------------------------------------------------------ engine units
def _grid(image, *, mpp, step=8, size=4):
    """A deterministic "segmenter": squares on a grid (exercises the plug-in path)."""
    lab = np.zeros(image.shape[:2], np.int32)
    k = 0
    for y in range(2, image.shape[0] - size, step):
        for x in range(2, image.shape[1] - size, step):
            k += 1
            lab[y:y + size, x:x + size] = k
    return lab


class _Darkness(Predictor):
    """Toy predictor: gene 'up' = darkness inside nucleus 2, gene 'down' = minus darkness inside nucleus 3."""

    kind, genes, setup = "toy", ["up", "down"], PatchSetup(10.0, 32)

    def __init__(self, labels):
        self.m2, self.m3 = torch.from_numpy(labels == 2), torch.from_numpy(labels == 3)

    def predict(self, ds):
        x = ds.__getitems__(list(range(len(ds)))).float()
        dark = 255.0 - x.mean(1)
        return np.c_[dark[:, self.m2].mean(1).numpy(), -dark[:, self.m3].mean(1).numpy()]


def _toy_patch():
    patch = np.full((32, 32, 3), 200, np.uint8)
    labels = np.zeros((32, 32), np.int32)
    for k, (y, x) in enumerate([(4, 4), (4, 20), (20, 4), (20, 20), (12, 12)], start=1):
        patch[y:y + 6, x:x + 6] = (60, 40, 110)
        labels[y:y + 6, x:x + 6] = k
    return patch, labels


def test_perturbed_patches_hide_exactly_the_dropped_nuclei():
    patch, labels = _toy_patch()
    z = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 0, 0, 1, 0]])
    ds = PerturbedPatches(patch, labels, np.array([230, 210, 220], np.uint8), z)
    x = ds.__getitems__([0, 1, 2]).numpy().transpose(0, 2, 3, 1)
    assert (x[0] == patch).all()
    assert (x[1][labels == 1] == (230, 210, 220)).all() and (x[1][labels != 1] == patch[labels != 1]).all()
    hidden = np.isin(labels, [2, 3, 5])
    assert (x[2][hidden] == (230, 210, 220)).all() and (x[2][~hidden] == patch[~hidden]).all()
    assert torch.equal(ds[1], ds.__getitems__([1])[0])


def test_lime_finds_the_nucleus_that_drives_each_gene():
    patch, labels = _toy_patch()
    pred = _Darkness(labels)
    res = lime(pred, patch, labels, np.array([200, 200, 200], np.uint8), [0, 1], n_samples=200, seed=1)
    assert res.scores.shape == (5, 2)
    assert np.argmax(res.scores[:, 0]) == 1 and res.scores[1, 0] > 10  # nucleus 2 raises 'up'
    assert np.argmin(res.scores[:, 1]) == 2 and res.scores[2, 1] < -10  # nucleus 3 lowers 'down'
    others = np.delete(res.scores[:, 0], 1)
    assert np.abs(others).max() < 0.05 * res.scores[1, 0]
    assert (res.fit > 0.95).all()  # the local linear model is exact here
    chk = deletion_check(pred, patch, labels, np.array([200, 200, 200], np.uint8), [0, 1], res.scores, top=0.2)
    assert chk["drop_top"][0] > 100 and chk["drop_top"][0] > chk["drop_random"][0]


def test_equal_area_draw_matches_the_target_area():
    rng = np.random.default_rng(0)
    areas = rng.integers(20, 200, 40).astype(float)
    for target in (150.0, 700.0, 2000.0):
        got = areas[equal_area_draw(areas, target, rng)].sum()
        assert abs(got - target) <= areas.max() / 2
    assert len(equal_area_draw(areas, 1e9, rng)) == 40


# ------------------------------------------------------------------------------------------ synthetic data
def _tiny_encoder(px=32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return get_encoder(net, input_px=px)


@pytest.fixture(scope="module")
def synth():
    """A synthetic section embedded by a tiny encoder, with a ridge on those features."""
    sdata = si.datasets.synthetic(24, 6, mpp=1.0)
    enc = _tiny_encoder()
    si.pp.embed(sdata, enc, patch_um=32, patch_px=32, progress=False, key_added="X_tiny")
    table = sdata["table"]
    ridge = si.models.RidgeRegressor(n_components=4).fit(table, "X_tiny", genes=list(table.var_names[:3]))
    return sdata, enc, ridge


def _kw(enc, **kw):
    return {"encoder": enc, "segmenter": _grid, "n_samples": 24, "progress": False, **kw}


def test_explain_synthetic_storage_and_plot(synth):
    import spatialdata as sd

    sdata0, enc, ridge = synth
    sdata = sd.SpatialData(images=dict(sdata0.images), shapes=dict(sdata0.shapes),
                           tables={"table": sdata0["table"].copy()})
    table = sdata["table"]
    genes = list(table.var_names[:2])
    spots = list(table.obs_names[[0, 5, 9]])
    si.tl.explain(sdata, ridge, genes=genes, spots=spots, **_kw(enc))
    res = table.uns["si_explain"]
    assert set(res) >= {"nuclei", "scores", "spots", "summary", "labels", "params"}
    assert res["params"]["method"] == "lime" and res["params"]["genes"] == genes
    assert list(res["spots"]["spot"]) == spots and res["labels"].shape == (3, 32, 32)
    n = res["spots"]["n_nuclei"].to_numpy()
    assert (n == res["labels"].reshape(3, -1).max(1)).all() and (n > 0).all()
    assert len(res["nuclei"]) == n.sum() and list(res["scores"].columns) == genes
    assert res["scores"].index.equals(res["nuclei"].index)
    assert len(res["summary"]) == 3 * 2 and np.isfinite(res["summary"]["prediction"]).all()
    # the encoder rebuilt for the patches reproduces the stored features
    assert (res["spots"]["feature_cosine"] > 0.999).all()
    # the prediction explained is the model's prediction for the stored features
    direct = ridge.predict(table[spots]).mean[:, :2]
    got = res["summary"].pivot(index="spot", columns="gene", values="prediction").loc[spots, genes].to_numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)
    # nuclei sit inside their spot's window; morphology in µm
    win = res["spots"].set_index("spot")
    nuc = res["nuclei"].join(win[["x0", "y0", "window_px"]], on="spot")
    assert ((nuc["x"] >= nuc["x0"]) & (nuc["x"] < nuc["x0"] + nuc["window_px"])).all()
    assert (nuc["area_um2"] > 0).all() and nuc["eccentricity"].between(0, 1).all()
    # SpatialData: one shapes element of nucleus outlines per section, with the scores
    shp = sdata.shapes["si_explain_S0"]
    assert len(shp) == n.sum() and set(genes) <= set(shp.columns)
    np.testing.assert_allclose(shp.geometry.centroid.x, shp["x"], atol=1.5)
    axs = si.pl.explain(sdata, spots[0], genes=genes)
    assert axs.shape == (1, 3)
    with pytest.raises(ValueError, match="no pixel maps"):
        si.pl.explain(sdata, spots[0], pixel_map=True)
    with pytest.raises(KeyError, match="Explain it with si.tl.explain"):
        si.pl.explain(sdata, table.obs_names[1])


def test_explain_errors_write_nothing(synth):
    sdata, enc, ridge = synth
    table = sdata["table"]
    before = (set(table.uns), set(sdata.shapes), set(table.obsm))
    spot = [table.obs_names[0]]
    with pytest.raises(KeyError, match="choose one of"):
        si.tl.explain(sdata, ridge, spots=spot, method="shap", **_kw(enc))
    with pytest.raises(ValueError, match="n_samples must be"):
        si.tl.explain(sdata, ridge, spots=spot, **_kw(enc, n_samples=3))
    with pytest.raises(KeyError, match="not in the table"):
        si.tl.explain(sdata, ridge, spots=["nope"], **_kw(enc))
    with pytest.raises(KeyError, match="are not predicted by RidgeRegressor"):
        si.tl.explain(sdata, ridge, spots=spot, genes=["NOTAGENE"], **_kw(enc))
    with pytest.raises(ValueError, match="hide_color"):
        si.tl.explain(sdata, ridge, spots=spot, **_kw(enc, hide_color="black"))
    with pytest.raises(ValueError, match="cannot be rebuilt from its name; pass encoder="):
        si.tl.explain(sdata, ridge, spots=spot, segmenter=_grid, n_samples=24, progress=False)
    with pytest.raises(TypeError, match="use method='lime'"):  # a model without a torch head
        si.tl.explain(sdata, _Plain(ridge), spots=spot, method="saliency", **_kw(enc))
    assert (set(table.uns), set(sdata.shapes), set(table.obsm)) == before
    si.tl.explain(sdata, ridge, spots=spot, key_added="ex_once", **_kw(enc))
    with pytest.raises(KeyError, match="overwrite=True"):
        si.tl.explain(sdata, ridge, spots=spot, key_added="ex_once", **_kw(enc))
    si.tl.explain(sdata, ridge, spots=spot, key_added="ex_once", overwrite=True, **_kw(enc))
    out = si.tl.explain(sdata, ridge, spots=spot, key_added="ex_never", inplace=False, **_kw(enc))
    assert "ex_never" not in table.uns and "ex_never_S0" not in sdata.shapes and len(out["nuclei"]) > 0


class _Plain:
    """Any model that predicts from .obsm features (as SCR²Net will): LIME needs nothing else."""

    def __init__(self, ridge):
        self.ridge, self.embedding_key_ = ridge, ridge.embedding_key_

    def predict(self, adata):
        p = self.ridge.predict(adata)
        return ExpressionPrediction(p.mean + 1.0, p.var_names)


def test_any_feature_model_and_anndata_input(synth):
    sdata0, enc, ridge = synth
    adata = si.datasets.synthetic(24, 6, mpp=1.0, as_anndata=True)
    si.pp.embed(adata, enc, patch_um=32, patch_px=32, progress=False, key_added="X_tiny")
    spots = adata.obs_names[:2]
    si.tl.explain(adata, _Plain(ridge), spots=spots, **_kw(enc))
    res = adata.uns["si_explain"]
    assert res["params"]["model"] == "_Plain" and len(res["summary"]) == 2 * 3
    assert (res["spots"]["feature_cosine"] > 0.999).all()
    axs = si.pl.explain(adata, spots[1])
    assert axs.shape == (1, 4)
    # a table without the features: the encoder comes from the model's own provenance record
    bare = adata.copy()
    del bare.obsm["X_tiny"], bare.uns["X_tiny"]
    out = si.tl.explain(bare, ridge, spots=spots[:1], inplace=False, **_kw(enc))
    direct = res["summary"][res["summary"]["spot"] == spots[0]]["prediction"].to_numpy() - 1.0  # _Plain adds 1
    np.testing.assert_allclose(out["summary"]["prediction"], direct, rtol=1e-4, atol=1e-4)
    assert np.isnan(out["spots"]["feature_cosine"]).all()
    # tiles of a slide without spots (si.pp.tile_image) are explained the same way
    img = np.moveaxis(np.asarray(sdata0.images["S0_full_image"].data), 0, -1)
    tiles = si.pp.tile_image(img, 32, mpp=1.0, min_tissue=0.0)
    si.pp.embed(tiles, enc, patch_um=32, patch_px=32, progress=False, key_added="X_tiny")
    out = si.tl.explain(tiles, ridge, spots=[0], inplace=False, **_kw(enc))
    assert len(out["summary"]) == 3 and (out["spots"]["feature_cosine"] > 0.999).all()


def test_gradient_explainers_ridge_head(synth):
    sdata, enc, ridge = synth
    table = sdata["table"]
    spots, genes = list(table.obs_names[[2, 7]]), list(table.var_names[:2])
    lime_res = si.tl.explain(sdata, ridge, spots=spots, genes=genes, inplace=False, **_kw(enc))
    ig = si.tl.explain(sdata, ridge, spots=spots, genes=genes, method="integrated_gradients", n_steps=64,
                       inplace=False, **_kw(enc))
    sal = si.tl.explain(sdata, ridge, spots=spots, genes=genes, method="saliency", inplace=False, **_kw(enc))
    # the torch head of the ridge is the fitted pipeline itself
    np.testing.assert_allclose(ig["summary"]["prediction"], lime_res["summary"]["prediction"], rtol=1e-4, atol=1e-4)
    # integrated gradients from the all-nuclei-hidden patch: nucleus scores add up to f(x) − f(hidden)
    s = ig["summary"]
    spot_of = ig["nuclei"]["spot"].to_numpy()
    total = [ig["scores"].loc[spot_of == sp, g].sum() for sp, g in zip(s["spot"], s["gene"], strict=True)]
    np.testing.assert_allclose(total, s["prediction"] - s["intercept"], atol=1e-3 + s["fit"].abs().max())
    assert ig["pixel_maps"].shape == (2, 2, 32, 32) and sal["pixel_maps"].min() >= 0
    assert np.isfinite(sal["scores"].to_numpy()).all()


def test_end_to_end_finetuner_lime_and_saliency():
    sdata = si.datasets.synthetic(24, 4, mpp=4.0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    m = si.models.NBFinetuner(sdata, encoder=net, target_key=None, patch_px=32, input_px=32, n_hidden=8)
    m.is_trained_ = True  # the explanation machinery, not the fit, is under test (training is tested elsewhere)
    spot = [sdata["table"].obs_names[3]]
    res = si.tl.explain(sdata, m, spots=spot, segmenter=_grid, n_samples=16, inplace=False, progress=False)
    assert res["params"]["predictor"] == "end-to-end model" and res["scores"].shape[1] == 4
    assert np.isnan(res["spots"]["feature_cosine"]).all()  # no stored features to compare with
    sal = si.tl.explain(sdata, m, spots=spot, segmenter=_grid, method="saliency", inplace=False, progress=False)
    np.testing.assert_allclose(sal["summary"]["prediction"], res["summary"]["prediction"], rtol=1e-4)


# ------------------------------------------------------------------------------------------ real HER2ST
@pytest.fixture(scope="module")
def c2(c2_sdata):
    """HER2ST C2 (full-resolution H&E) in a SpatialData of its own: the session fixture stays untouched."""
    import spatialdata as sd

    return sd.SpatialData(images=dict(c2_sdata.images), shapes={"C2": c2_sdata.shapes["C2"]},
                          tables={"table": c2_sdata["table"].copy()})


@pytest.mark.real
@pytest.mark.slow
def test_masking_top_nuclei_changes_prediction_more_than_random_equal_area(c2):
    """Faithfulness on 20 real patches: hiding the top-scored nuclei moves the ridge prediction more than
    hiding random nuclei of the same total area (mean over patches, both genes).

    The encoder runs at 112 px (EfficientNet-Lite0 pools globally) to keep CI fast; nuclei are segmented on
    the full-resolution crops.
    """
    enc = get_encoder("efficientnet_lite0")
    enc.input_px, enc._dim = 112, None
    si.pp.embed(c2, enc, patch_px=112, progress=False, key_added="X_lite0_112")
    table = c2["table"]
    genes = ["ERBB2", "IGKC"]
    ridge = si.models.RidgeRegressor(n_components=32).fit(table, "X_lite0_112", genes=[*genes, "CD74", "FASN"])
    spots = np.random.default_rng(0).choice(table.n_obs, 20, replace=False)
    res = si.tl.explain(c2, ridge, genes=genes, spots=spots, n_samples=64, encoder=enc, inplace=False,
                        progress=False)
    s = res["summary"]
    assert len(s) == 40 and (res["spots"]["n_nuclei"] >= 5).all()
    assert (res["spots"]["feature_cosine"] > 0.999).all()
    top, rnd = s.groupby("gene")["change_top"].mean(), s.groupby("gene")["change_random"].mean()
    assert (top > 1.5 * rnd).all(), pd.DataFrame({"top": top, "random": rnd})
    assert (s["drop_top"] > 0).mean() > 0.75  # the top-scored nuclei raise the prediction: hiding them lowers it
    assert s["fit"].median() > 0.5


@pytest.mark.real
@pytest.mark.slow
def test_nb_ensemble_explanations_real(c2):
    """The NB ensemble explained through the encoder of its embedding provenance (rebuilt from .uns)."""
    si.pp.embed(c2, progress=False)  # EfficientNet-Lite0, 112 µm → 224 px
    table = c2["table"]
    genes = ["ERBB2", "IGKC"]
    si.models.NBRegressor.setup_anndata(table, embedding_key="X_efficientnet_lite0", genes=genes)
    ens = si.models.NBEnsemble(table, n_members=2, n_hidden=32)
    ens.train(max_epochs=4, accelerator="cpu", early_stopping=False, validation_size=0)
    spots = ["C2_24x27", "C2_14x20"]
    si.tl.explain(c2, ens, genes=genes, spots=spots, n_samples=32, progress=False)
    res = table.uns["si_explain"]
    assert res["params"]["embedding_key"] == ["X_efficientnet_lite0"]
    assert (res["spots"]["feature_cosine"] > 0.999).all() and (res["spots"]["n_nuclei"] > 10).all()
    direct = ens.predict(table[spots]).mean
    got = res["summary"].pivot(index="spot", columns="gene", values="prediction").loc[spots, genes].to_numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-3)
    area = res["nuclei"]["area_um2"]
    assert area.min() >= 9.9 and 15 < area.median() < 80  # µm², measured at full resolution
    assert len(c2.shapes["si_explain_C2"]) == len(res["nuclei"])
    ig = si.tl.explain(c2, ens, genes=["ERBB2"], spots=spots[:1], method="integrated_gradients", n_steps=4,
                       inplace=False, progress=False)
    assert ig["pixel_maps"].shape == (1, 1, 224, 224) and np.isfinite(ig["scores"].to_numpy()).all()
    fig = si.pl.explain(c2, spots[0], genes=genes, return_fig=True)
    assert len(fig.axes) == 5  # patch, two genes, two colour bars
