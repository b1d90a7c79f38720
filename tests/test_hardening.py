"""Hardening suite (issue 14): malformed input to every public function works or fails clearly, untouched.

Each case feeds one malformed input to one public function and expects either success or an error
whose message names the problem (and, in the message, the fix). After any error the input object
must be unchanged (compared with a snapshot taken before the call). Property-based tests
(hypothesis) cover the array-level checks: metrics, image conversion, training-spot selection and
gene selection.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stimg as si
from stimg._utils import StimgWarning

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore::UserWarning:scvi",
                                        "ignore::UserWarning:anndata")


# ----------------------------------------------------------------------------------------------- data
_BASE = {}


def _base() -> Any:
    """Two 30-spot sections with 350×350 px images (4 µm/px), 8 genes, an embedding, patients."""
    if "a" not in _BASE:
        a = si.datasets.synthetic(30, 8, as_anndata=True, mpp=4.0, n_sections=2, seed=1)
        a.obs["patient"] = np.where(a.obs["library_id"] == "S0", "P0", "P1")
        a.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "patch_um": 112.0, "patch_px": 224}}
        _BASE["a"] = a
    return _BASE["a"].copy()


def _lib0(a):
    return next(iter(a.uns["spatial"]))


def _dense(a) -> np.ndarray:
    return a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)


def _mod(fn: Callable) -> Callable:
    def make():
        a = _base()
        fn(a)
        return a
    return make


def _set_X(a, f):
    a.X = f(_dense(a).astype(np.float64))


def _nan_X(a):
    _set_X(a, lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x))


def _neg_X(a):
    _set_X(a, lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, -3.0, x))


def _zero_spots(a):
    _set_X(a, lambda x: x * (np.arange(a.n_obs) >= 3)[:, None])


def _inf_emb(a):
    a.obsm["X_synthetic"][1, 2] = np.inf


def _str_emb(a):
    a.obsm["X_synthetic"] = a.obsm["X_synthetic"].astype(str)


def _nan_xy(a):
    a.obsm["spatial"][[3, 4]] = np.nan


def _off_image(a):
    a.obsm["spatial"][4] = [1e5, 1e5]


def _dup_names(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.obs_names = ["dup"] * 5 + list(a.obs_names[5:])


def _image(f):
    def mod(a):
        for lib in a.uns["spatial"]:
            imgs = a.uns["spatial"][lib]["images"]
            imgs["hires"] = f(imgs["hires"])
    return mod


def _str_col(a):
    a.obs["m"] = ["yes"] * a.n_obs


def _pred(a):
    a.layers["si_pred"] = np.log1p(_dense(a)).astype(np.float32)


def _empty_obs():
    return _base()[:0].copy()


def _no_genes():
    return _base()[:, :0].copy()


def _tiny():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


_MODELS: dict[str, Any] = {}


def _ridge():
    if "ridge" not in _MODELS:
        a = _base()
        _MODELS["ridge"] = si.models.RidgeRegressor(n_components=3, alpha=1.0).fit(a, "X_synthetic",
                                                                                   genes=list(a.var_names[:3]))
    return _MODELS["ridge"]


# ----------------------------------------------------------------------------------------------- snapshots
def _snap(obj) -> dict:
    table = obj if not si._spatial.is_spatialdata(obj) else obj.tables["table"]

    def arr(x):
        return (x.toarray() if sp.issparse(x) else np.asarray(x)).copy()

    return {"X": arr(table.X), "obs": table.obs.copy(), "var": table.var.copy(), "names": list(table.obs_names),
            "obsm": {k: arr(v) for k, v in table.obsm.items()}, "layers": {k: arr(v) for k, v in table.layers.items()},
            "uns": copy.deepcopy(dict(table.uns))}


def _equal(x, y) -> bool:
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, pd.DataFrame):
        return x.equals(y)
    if isinstance(x, np.ndarray):
        return (isinstance(y, np.ndarray) and x.shape == y.shape
                and bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")))
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y, strict=True))
    return bool(x == y)


# ----------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    """One malformed input: ``call(make())`` must succeed (``expect='ok'``) or raise ``expect``."""

    id: str
    function: str
    input: str
    make: Callable
    call: Callable
    expect: Any = "ok"  # "ok" or (exception type, message regex)
    warns: str | None = None  # a StimgWarning expected on success


def _nb_setup(a, **kw):
    return si.models.NBRegressor.setup_anndata(a, embedding_key="X_synthetic", **kw)


def _ridge_fit(a, **kw):
    kw = {"genes": list(a.var_names[:3]), **kw}
    return si.models.RidgeRegressor(n_components=3, alpha=1.0).fit(a, "X_synthetic", **kw)


def _active(budget, method="random"):
    return lambda a: si.tl.active_sample(a, budget, method=method, embedding_key="X_synthetic")


_NONFINITE = (ValueError, r"non-finite|NaN/inf")
CASES = [
    # ---- images: dtypes, channels
    Case("img-float01", "pp.extract_patches", "float image in [0, 1]", _mod(_image(lambda i: i / 255.0)),
         lambda a: si.pp.extract_patches(a, patch_px=16)[0]),
    Case("img-uint16", "pp.tissue_coverage", "uint16 image (full 16-bit range)",
         _mod(_image(lambda i: i.astype(np.uint16) * 257)), lambda a: si.pp.tissue_coverage(a, inplace=False)),
    Case("img-rgba", "pp.tissue_coverage", "RGBA image", _mod(_image(lambda i: np.dstack([i, np.full(i.shape[:2], 255, np.uint8)]))),
         lambda a: si.pp.tissue_coverage(a, inplace=False)),
    Case("img-gray", "pp.embed", "grayscale 2-D image", _mod(_image(lambda i: i.mean(-1).astype(np.uint8))),
         lambda a: si.pp.embed(a, _tiny(), patch_px=16, cache=False), warns="grayscale"),
    Case("img-2ch", "pp.embed", "2-channel image", _mod(_image(lambda i: i[..., :2])),
         lambda a: si.pp.embed(a, _tiny(), patch_px=16, cache=False), (ValueError, "2 channels.*select the RGB")),
    Case("img-float300", "pp.tissue_coverage", "float image with values up to 300", _mod(_image(lambda i: i * 1.2)),
         lambda a: si.pp.tissue_coverage(a), (ValueError, r"values up to .*rescale it to \[0, 1\]")),
    Case("img-nan", "pp.extract_patches", "image with NaN pixels",
         _mod(_image(lambda i: np.where(i > 100, np.nan, i / 255.0))), lambda a: si.pp.extract_patches(a), _NONFINITE),
    Case("img-bool", "pl.spatial", "boolean image", _mod(_image(lambda i: i > 100)),
         lambda a: si.pl.spatial(a, "gene_0"), (TypeError, "dtype bool.*uint8")),
    Case("read_image-2ch", "io.read_image", "(y, x, 2) array", lambda: None,
         lambda _: si.io.read_image(np.zeros((5, 5, 2), np.uint8)), (ValueError, r"must have shape \(y, x, 3\)")),
    Case("read_image-int64", "io.read_image", "int64 values up to 1e6", lambda: None,
         lambda _: si.io.read_image(np.full((5, 5, 3), 10**6)), (ValueError, "convert it to 8-bit")),
    Case("read_image-missing", "io.read_image", "missing file", lambda: None,
         lambda _: si.io.read_image("/nonexistent/he.png"), (FileNotFoundError, "does not exist; check the path")),
    Case("stain_vectors-nan", "pp.stain_vectors", "NaN pixels", lambda: None,
         lambda _: si.pp.stain_vectors(np.full((10, 10, 3), np.nan)), _NONFINITE),
    Case("stain_vectors-blank", "pp.stain_vectors", "all-white image", lambda: None,
         lambda _: si.pp.stain_vectors(np.full((10, 10, 3), 255, np.uint8)), (ValueError, "blank or background")),
    Case("tile-gray", "pp.tile_image", "grayscale 2-D image", lambda: None,
         lambda _: si.pp.tile_image(np.full((200, 200), 128, np.uint8), 50, mpp=1.0), (ValueError, "RGB image")),
    Case("tile-mpp0", "pp.tile_image", "mpp=0", lambda: None,
         lambda _: si.pp.tile_image(np.zeros((200, 200, 3), np.uint8), 50, mpp=0), (ValueError, "mpp must be a positive")),
    Case("tile-huge", "pp.tile_image", "tile_um=1e6", lambda: None,
         lambda _: si.pp.tile_image(np.zeros((200, 200, 3), np.uint8), 1e6, mpp=1.0), (ValueError, "check mpp and tile_um")),
    # ---- coordinates
    Case("xy-nan-coverage", "pp.tissue_coverage", "NaN spot coordinates", _mod(_nan_xy),
         lambda a: si.pp.tissue_coverage(a), (ValueError, r"2 of 30 spots .*non-finite.*drop them first")),
    Case("xy-nan-embed", "pp.embed", "NaN spot coordinates", _mod(_nan_xy),
         lambda a: si.pp.embed(a, _tiny(), patch_px=16), (ValueError, "non-finite .*coordinates")),
    Case("xy-nan-grid", "pp.embed_grid", "NaN spot coordinates", _mod(_nan_xy),
         lambda a: si.pp.embed_grid(a, _tiny(), patch_px=16), (ValueError, "non-finite .*coordinates")),
    Case("xy-nan-plot", "pl.spatial", "NaN spot coordinates", _mod(_nan_xy),
         lambda a: si.pl.spatial(a, "gene_0"), (ValueError, "non-finite .*coordinates")),
    Case("xy-nan-sample", "tl.active_sample", "NaN spot coordinates", _mod(_nan_xy), _active(5), _NONFINITE),
    Case("xy-off-image", "pp.extract_patches", "spot far outside the image", _mod(_off_image),
         lambda a: si.pp.extract_patches(a), (ValueError, r"lie outside its 350×350 image .*drop the spots")),
    Case("xy-off-image-embed", "pp.embed", "spot far outside the image", _mod(_off_image),
         lambda a: si.pp.embed(a, _tiny(), patch_px=16), (ValueError, "outside its")),
    Case("patch-huge", "pp.extract_patches", "patch_um=1e6", _base,
         lambda a: si.pp.extract_patches(a, patch_um=1e6), (ValueError, r"GB per patch\); patch_um is the patch side in µm")),
    Case("patch-nan", "pp.embed", "patch_um=NaN", _base,
         lambda a: si.pp.embed(a, _tiny(), patch_um=float("nan")), (ValueError, "patch_um must be a positive")),
    Case("patch-px0", "pp.extract_patches", "patch_px=0", _base,
         lambda a: si.pp.extract_patches(a, patch_px=0), (ValueError, "patch_px must be ≥ 1")),
    Case("library-missing", "pp.embed", "library_id not in the table", _base,
         lambda a: si.pp.embed(a, _tiny(), library_id="S9"), (KeyError, r"'S9' not found.*Available: \['S0', 'S1'\]")),
    Case("image-key-missing", "pp.tissue_coverage", "image_key not in the table", _base,
         lambda a: si.pp.tissue_coverage(a, image_key="nope"), (KeyError, "Available: .'hires'.")),
    Case("coverage-range", "pp.tissue_coverage", "min_coverage=2", _base,
         lambda a: si.pp.tissue_coverage(a, min_coverage=2), (ValueError, r"must be in \[0.0, 1.0\]")),
    # ---- empty tables
    Case("empty-embed", "pp.embed", "table with 0 spots", _empty_obs,
         lambda a: si.pp.embed(a, _tiny()), (ValueError, "no spots.*check the filtering")),
    Case("empty-genes", "pp.select_genes", "table with 0 spots", _empty_obs,
         lambda a: si.pp.select_genes(a, 3), (ValueError, "subset of spots is empty")),
    Case("empty-nb", "models.NBRegressor.setup_anndata", "table with 0 spots", _empty_obs,
         _nb_setup, (ValueError, "no spots")),
    Case("empty-nb-genes", "models.NBRegressor.setup_anndata", "table with 0 genes", _no_genes,
         _nb_setup, (ValueError, "gene list .* is empty")),
    Case("empty-predict", "tl.predict_expression", "table with 0 spots", _empty_obs,
         lambda a: si.tl.predict_expression(a, _ridge()), (ValueError, "nothing to predict")),
    Case("empty-sample", "tl.active_sample", "table with 0 spots", _empty_obs, _active(5), (ValueError, "no spots")),
    Case("empty-plot", "pl.spatial", "table with 0 spots", _empty_obs,
         lambda a: si.pl.spatial(a), (ValueError, "no spots")),
    Case("empty-metric", "metrics.pearson", "0 spots", lambda: None,
         lambda _: si.metrics.pearson(np.zeros((0, 3)), np.zeros((0, 3))), (ValueError, "no spots or no genes")),
    Case("empty-mse", "metrics.mse", "0 genes", lambda: None,
         lambda _: si.metrics.mse(np.zeros((4, 0)), np.zeros((4, 0))), (ValueError, "no spots or no genes")),
    Case("synthetic-0", "datasets.synthetic", "n_spots=0", lambda: None,
         lambda _: si.datasets.synthetic(0), (ValueError, "must all be ≥ 1")),
    # ---- NaN / inf / dtypes in tables
    Case("nan-X-genes", "pp.select_genes", "NaN count", _mod(_nan_X),
         lambda a: si.pp.select_genes(a, 3), (ValueError, "1 non-finite .*drop those spots")),
    Case("neg-X-genes", "pp.select_genes", "negative count", _mod(_neg_X),
         lambda a: si.pp.select_genes(a, 3), (ValueError, "negative values .*raw-count layer")),
    Case("nan-X-ridge", "models.RidgeRegressor.fit", "NaN count", _mod(_nan_X), _ridge_fit, _NONFINITE),
    Case("neg-X-ridge", "models.RidgeRegressor.fit", "negative count", _mod(_neg_X), _ridge_fit,
         (ValueError, "negative values: pass raw counts")),
    Case("nan-X-nb", "models.NBRegressor.setup_anndata", "NaN count", _mod(_nan_X), _nb_setup, _NONFINITE),
    Case("neg-X-nb", "models.NBRegressor.setup_anndata", "negative count", _mod(_neg_X), _nb_setup,
         (ValueError, "non-negative; pass the raw-count layer")),
    Case("neg-X-classify", "tl.classify_expression", "negative count", _mod(_neg_X),
         lambda a: si.tl.classify_expression(a, embedding_key="X_synthetic", genes=a.var_names[:2], target_key=None),
         (ValueError, "negative values .*raw-count layer")),
    Case("inf-emb-ridge", "models.RidgeRegressor.fit", "inf in the embedding", _mod(_inf_emb), _ridge_fit, _NONFINITE),
    Case("inf-emb-nb", "models.NBRegressor.setup_anndata", "inf in the embedding", _mod(_inf_emb), _nb_setup,
         _NONFINITE),
    Case("inf-emb-predict", "tl.predict_expression", "inf in the embedding", _mod(_inf_emb),
         lambda a: si.tl.predict_expression(a, _ridge()), _NONFINITE),
    Case("inf-emb-sample", "tl.active_sample", "inf in the embedding", _mod(_inf_emb), _active(5, "diversity"),
         _NONFINITE),
    Case("str-emb-ridge", "models.RidgeRegressor.fit", "string embedding", _mod(_str_emb), _ridge_fit,
         (TypeError, "must be numeric")),
    Case("str-emb-classify", "tl.classify_expression", "string embedding", _mod(_str_emb),
         lambda a: si.tl.classify_expression(a, embedding_key="X_synthetic", genes=a.var_names[:2], target_key=None),
         (TypeError, "must be numeric")),
    Case("nan-metric", "metrics.pearson", "NaN in y_true", lambda: None,
         lambda _: si.metrics.pearson(np.array([[1.0, np.nan], [2, 3], [3, 1]]), np.ones((3, 2))), _NONFINITE),
    Case("shape-metric", "metrics.mae", "shapes differ", lambda: None,
         lambda _: si.metrics.mae(np.ones((3, 2)), np.ones((2, 2))), (ValueError, r"y_pred must have shape \(3, 2\)")),
    Case("groups-metric", "metrics.mse", "groups of the wrong length", lambda: None,
         lambda _: si.metrics.mse(np.ones((3, 2)), np.ones((3, 2)), groups=["a"]), (ValueError, "1 entries for 3 spots")),
    Case("str-metric", "metrics.pearson", "string arrays", lambda: None,
         lambda _: si.metrics.pearson(np.ones((3, 2)).astype(str), np.ones((3, 2))), (TypeError, "must be numeric")),
    Case("calib-nan", "metrics.uncertainty_calibration", "NaN uncertainty", lambda: None,
         lambda _: si.metrics.uncertainty_calibration(np.ones((4, 2)), np.ones((4, 2)), np.full((4, 2), np.nan)),
         _NONFINITE),
    Case("mpp-degenerate", "io.estimate_mpp", "all spots at one pixel", lambda: None,
         lambda _: si.io.estimate_mpp(np.array([[1, 1], [2, 1]]), np.ones((2, 2))), (ValueError, "pass mpp=")),
    Case("mpp-nan", "io.estimate_mpp", "NaN pixel coordinates", lambda: None,
         lambda _: si.io.estimate_mpp(np.array([[1, 1], [2, 2]]), np.array([[np.nan, 1], [3, 4]])), _NONFINITE),
    # ---- duplicate barcodes: stimg works by position and warns
    Case("dup-coverage", "pp.tissue_coverage", "duplicate obs_names", _mod(_dup_names),
         lambda a: si.pp.tissue_coverage(a), warns="obs_names_make_unique"),
    Case("dup-embed", "pp.embed", "duplicate obs_names", _mod(_dup_names),
         lambda a: si.pp.embed(a, _tiny(), patch_px=16, cache=False), warns="obs_names_make_unique"),
    Case("dup-predict", "tl.predict_expression", "duplicate obs_names", _mod(_dup_names),
         lambda a: si.tl.predict_expression(a, _ridge()), warns="obs_names_make_unique"),
    Case("dup-sample", "tl.active_sample", "duplicate obs_names", _mod(_dup_names), _active(5),
         warns="obs_names_make_unique"),
    # ---- zero-count spots
    Case("zero-genes", "pp.select_genes", "3 spots with no counts", _mod(_zero_spots), lambda a: si.pp.select_genes(a, 3)),
    Case("zero-ridge", "models.RidgeRegressor.fit", "3 spots with no counts", _mod(_zero_spots), _ridge_fit),
    Case("zero-nb", "models.NBRegressor.setup_anndata", "3 spots with no counts", _mod(_zero_spots), _nb_setup),
    Case("zero-nb-library", "models.NBRegressor.setup_anndata", "3 spots with no counts, library_size=True",
         _mod(_zero_spots), lambda a: _nb_setup(a, library_size=True), (ValueError, "drop empty spots first")),
    Case("zero-evaluate", "tl.evaluate", "3 spots with no counts", _mod(lambda a: (_zero_spots(a), _pred(a))),
         lambda a: si.tl.evaluate(a, inplace=False)),
    # ---- genes missing from a model's training set / from the table
    Case("genes-predict", "tl.predict_expression", "table lacks the model's genes", lambda: _base()[:, 3:].copy(),
         lambda a: si.tl.predict_expression(a, _ridge()), (KeyError, "absent from the table.*inplace=False")),
    Case("genes-predict-nogenes", "RidgeRegressor.predict", "table without any gene", _no_genes,
         lambda a: _ridge().predict(a)),
    Case("genes-ridge", "models.RidgeRegressor.fit", "unknown target gene", _base,
         lambda a: _ridge_fit(a, genes=["nope"]), (KeyError, r"not in adata.var_names \(e.g. \['nope'\]\)")),
    Case("genes-nb", "models.NBRegressor.setup_anndata", "unknown target gene", _base,
         lambda a: _nb_setup(a, genes=["nope"]), (KeyError, "missing from var_names")),
    Case("genes-nb-dup", "models.NBRegressor.setup_anndata", "a gene listed twice", _base,
         lambda a: _nb_setup(a, genes=["gene_0", "gene_0"]), (ValueError, "pass each gene once")),
    Case("genes-classify", "tl.classify_expression", "unknown gene", _base,
         lambda a: si.tl.classify_expression(a, embedding_key="X_synthetic", genes=["nope"]), (KeyError, "nope")),
    Case("genes-evaluate", "tl.evaluate", "unknown gene", _mod(_pred),
         lambda a: si.tl.evaluate(a, genes=["nope"]), (KeyError, "nope")),
    Case("genes-select", "pp.select_genes", "n_top > genes", _base,
         lambda a: si.pp.select_genes(a, 100), (ValueError, "lower n_top or min_spots")),
    Case("provenance", "tl.predict_expression", "features of another encoder",
         _mod(lambda a: a.uns["X_synthetic"]["params"].update(encoder="uni")),
         lambda a: si.tl.predict_expression(a, _ridge()), (ValueError, "encoder='uni'.*si.pp.embed")),
    # ---- budgets and selections
    Case("budget-0", "tl.active_sample", "budget=0", _base, _active(0), (ValueError, "budget must be positive")),
    Case("budget-neg", "tl.active_sample", "budget=-1", _base, _active(-1), (ValueError, "budget must be positive")),
    Case("budget-frac", "tl.active_sample", "budget=1.5", _base, _active(1.5), (ValueError, "whole number of spots")),
    Case("budget-pool", "tl.active_sample", "budget > pool (61 of 60)", _base, _active(61),
         (ValueError, "exceeds the 60 spots available")),
    Case("budget-grid-pool", "tl.active_sample", "grid, budget > pool", _base, _active(1000, "grid"),
         (ValueError, "exceeds the 60 spots")),
    Case("budget-all", "tl.active_sample", "budget = pool", _base, _active(60)),
    Case("budget-sim-0", "tl.simulate_sampling", "budgets=[0]", _base,
         lambda a: si.tl.simulate_sampling(a, ["random"], [0], test="S1", seeds=[0], n_genes=3,
                                           embedding_key="X_synthetic"), (ValueError, "budget must be positive")),
    Case("budget-sim-pool", "tl.simulate_sampling", "budgets=[1000]", _base,
         lambda a: si.tl.simulate_sampling(a, ["random"], [1000], test="S1", seeds=[0], n_genes=3,
                                           embedding_key="X_synthetic"), (ValueError, "exceeds the 30 spots")),
    Case("method-unknown", "tl.active_sample", "unknown method", _base, _active(5, "nope"),
         (ValueError, "Unknown method 'nope'; choose")),
    Case("train-str-col", "models.RidgeRegressor.fit", "train_indices names a non-boolean column", _mod(_str_col),
         lambda a: _ridge_fit(a, train_indices="m"), (TypeError, "must be boolean.*astype")),
    Case("train-floats", "models.RidgeRegressor.fit", "train_indices of fractions", _base,
         lambda a: _ridge_fit(a, train_indices=np.array([0.5, 1.2])), (TypeError, "integer positions or a boolean")),
    Case("train-none", "models.RidgeRegressor.fit", "train_indices selects nothing", _base,
         lambda a: _ridge_fit(a, train_indices=np.zeros(a.n_obs, bool)), (ValueError, "selects no spot")),
    Case("train-range", "models.RidgeRegressor.fit", "train_indices out of range", _base,
         lambda a: _ridge_fit(a, train_indices=[0, 999]), (ValueError, r"must lie in \[0, 60\)")),
    Case("eval-mask-none", "tl.evaluate", "mask selects nothing", _mod(_pred),
         lambda a: si.tl.evaluate(a, mask=np.zeros(a.n_obs, bool)), (ValueError, "mask is empty. Select")),
    Case("classify-mask-none", "tl.classify_expression", "train_mask selects nothing", _base,
         lambda a: si.tl.classify_expression(a, embedding_key="X_synthetic", genes=a.var_names[:2],
                                             train_mask=np.zeros(a.n_obs, bool)), (ValueError, "train_mask is empty")),
    Case("split-patient", "tl.split_by_patient", "unknown test patient", _base,
         lambda a: si.tl.split_by_patient(a, test_patients=["P9"]), (KeyError, r"Available: \['P0', 'P1'\]")),
    Case("leakage-col", "tl.check_split_leakage", "no split column", _base,
         lambda a: si.tl.check_split_leakage(a), (KeyError, "Run si.tl.split_by_patient first")),
    # ---- other wrong arguments
    Case("predict-object", "tl.predict_expression", "not a model", _base,
         lambda a: si.tl.predict_expression(a, object()), (TypeError, "pass a trained stimg model")),
    Case("pred-missing", "tl.evaluate", "no prediction layer", _base,
         lambda a: si.tl.evaluate(a), (KeyError, "Run si.tl.predict_expression first")),
    Case("plot-color", "pl.spatial", "unknown colour key", _base,
         lambda a: si.pl.spatial(a, "nope"), (KeyError, "neither an obs column, a gene")),
    Case("plot-uncertainty", "pl.uncertainty", "no uncertainty layers", _base,
         lambda a: si.pl.uncertainty(a, "gene_0"), (KeyError, "with an ensemble model first")),
    Case("plot-patches", "pl.patches", "patch index out of range", _base,
         lambda a: si.pl.patches(si.pp.extract_patches(a, patch_px=16), [999]), (IndexError, "out of range")),
    Case("curve-empty", "pl.sampling_curve", "empty results", lambda: None,
         lambda _: si.pl.sampling_curve(pd.DataFrame()), (KeyError, "pass the output of si.tl.simulate_sampling")),
    Case("her2st-int", "datasets.her2st", "section=2", lambda: None,
         lambda _: si.datasets.her2st(2), (TypeError, "section name such as 'C2'")),
    Case("her2st-unknown", "datasets.her2st", "section='Z9'", lambda: None,
         lambda _: si.datasets.her2st("Z9"), (ValueError, "Known sections: A1")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input(case: Case):
    data = case.make()
    before = None if data is None else _snap(data)
    if case.expect == "ok":
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always", StimgWarning)
            case.call(data)
        msgs = [str(w.message) for w in rec if issubclass(w.category, StimgWarning)]
        if case.warns is None:
            assert not msgs, msgs
        else:
            assert any(case.warns in m for m in msgs), msgs
        return
    exc, pattern = case.expect
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StimgWarning)  # e.g. a grayscale warning before the error
        with pytest.raises(exc, match=pattern):
            case.call(data)
    if before is not None:
        assert _equal(before, _snap(data)), f"{case.function} changed its input before failing"


def test_model_setup_writes_nothing_on_error():
    a = _base()
    _nan_X(a)
    with pytest.raises(ValueError, match="non-finite"):
        _nb_setup(a)
    assert "_si_nb_counts" not in a.obsm and "_scvi_uuid" not in a.uns


# ----------------------------------------------------------------------------------------------- properties
_FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _matrix_pair(draw):
    n, g = draw(st.integers(2, 12)), draw(st.integers(1, 4))
    finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)
    yt = draw(hnp.arrays(np.float64, (n, g), elements=finite))
    yp = draw(hnp.arrays(np.float64, (n, g), elements=finite))
    bad = draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
    if bad is not None:
        which = draw(st.sampled_from(["y_true", "y_pred"]))
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, g - 1))
        (yt if which == "y_true" else yp)[i, j] = bad
    return yt, yp, bad


@_FAST
@given(_matrix_pair())
def test_metrics_refuse_nonfinite_and_score_finite(pair):
    yt, yp, bad = pair
    yt0, yp0 = yt.copy(), yp.copy()
    for f in (si.metrics.pearson, si.metrics.mse, si.metrics.mae):
        if bad is not None:
            with pytest.raises(ValueError, match="non-finite"):
                f(yt, yp)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # no silent 0/0
                out = f(yt, yp)
            if f is not si.metrics.pearson:
                assert np.isfinite(out)
    np.testing.assert_array_equal(yt, yt0)
    np.testing.assert_array_equal(yp, yp0)


_DTYPES = [np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]


@st.composite
def _images(draw):
    dt = draw(st.sampled_from(_DTYPES))
    shape = draw(st.sampled_from([(6, 7), (6, 7, 1), (6, 7, 2), (6, 7, 3), (6, 7, 4), (6, 7, 5)]))
    if dt == np.bool_:
        elems = st.booleans()
    elif np.issubdtype(dt, np.integer):
        elems = st.integers(0, int(min(np.iinfo(dt).max, 70000)))
    else:
        elems = st.floats(0, draw(st.sampled_from([1.0, 255.0, 1000.0])), width=32)
    return draw(hnp.arrays(dt, shape, elements=elems))


@_FAST
@given(_images())
def test_any_image_array_is_converted_or_refused(img):
    before = img.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StimgWarning)
        try:
            out = si.io.read_image(img)
        except (ValueError, TypeError) as e:
            msg = str(e)
            assert any(w in msg for w in ("RGB", "rescale", "convert", "uint8")), msg
        else:
            assert out.shape == (6, 7, 3) and out.dtype == np.uint8
            if img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3:
                np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(img, before)


@_FAST
@given(st.one_of(
    hnp.arrays(np.bool_, st.integers(0, 12)),
    hnp.arrays(np.int64, st.integers(0, 6), elements=st.integers(-3, 12)),
    st.none(),
))
def test_train_indices_are_resolved_or_refused(sel):
    from anndata import AnnData

    from stimg.models._base import resolve_train_indices

    a = AnnData(np.zeros((10, 1), np.float32))
    try:
        rows = resolve_train_indices(a, sel)
    except (ValueError, TypeError) as e:
        assert any(w in str(e) for w in ("selects no spot", "must lie in", "one entry per spot")), str(e)
    else:
        assert rows.size and np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 10


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.float64, (12, 6), elements=st.floats(0, 30, allow_nan=False)),
       st.sampled_from([None, np.nan, -1.0, np.inf]))
def test_select_genes_on_random_counts(counts, bad):
    from anndata import AnnData

    counts = np.round(counts)
    if bad is not None:
        counts[3, 2] = bad
    a = AnnData(counts.copy())
    before = _snap(a)
    try:
        si.pp.select_genes(a, 2, min_spots=0.0)
    except ValueError as e:
        assert bad is not None and ("non-finite" in str(e) or "negative" in str(e)), str(e)
        assert _equal(before, _snap(a))
    else:
        assert bad is None and int(a.var["si_target"].sum()) == 2
