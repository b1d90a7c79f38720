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


def _mod(fn: Callable, base: Callable | None = None) -> Callable:
    """A case input: a fresh ``base()`` table (default :func:`_base`) changed in place by ``fn``."""
    def make():
        a = (base or _base)()
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
    Case("empty-sample", "tl.active_sample", "table with 0 spots", _empty_obs, _active(5), (ValueError, "no spots .*check the filtering")),
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
         lambda a: si.tl.simulate_sampling(a, ["random"], [0], test="S1", seeds=[0], genes=3,
                                           embedding_key="X_synthetic"), (ValueError, "budget must be positive")),
    Case("budget-sim-pool", "tl.simulate_sampling", "budgets=[1000]", _base,
         lambda a: si.tl.simulate_sampling(a, ["random"], [1000], test="S1", seeds=[0], genes=3,
                                           embedding_key="X_synthetic"), (ValueError, "exceeds the 30 spots")),
    Case("method-unknown", "tl.active_sample", "unknown method", _base, _active(5, "nope"),
         (ValueError, "Unknown sampling method 'nope'; registered: .*register_sampler")),
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


# ----------------------------------------------------------------------------------------------- functions merged later
def _aligner():
    if "align" not in _MODELS:
        a = _base()
        si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic", genes=a.var_names)
        m = si.models.ContrastiveAligner(a, n_latent=4, image_hidden=8, gene_hidden=8, seed=0)
        m.train(2, batch_size=32, accelerator="cpu", progress=False)
        _MODELS["align"] = m
    return _MODELS["align"]


def _scr2net(train: bool = True):
    key = f"scr2net{train}"
    if key not in _MODELS:
        m = si.models.SCR2Net(_base(), "X_synthetic", target_key=None, cell_types="cell_type", top_k=5, n_types=2,
                              n_hidden=8, n_proj=4)
        if train:
            m.train(max_epochs=1, accelerator="cpu", batch_size=32, progress=False, seed=0)
        _MODELS[key] = m
    return _MODELS[key]


def _scr2(a, **kw):
    kw = {"target_key": None, "top_k": 5, "n_hidden": 8, "n_proj": 4, **kw}
    return si.models.SCR2Net(a, "X_synthetic", **kw).train(max_epochs=1, accelerator="cpu", batch_size=32,
                                                          progress=False)


def _tiny_encoder():
    from stimg.encoders import get_encoder

    return get_encoder(_tiny(), input_px=16)


def _xbase():
    """The base table embedded by a tiny encoder (16 px patches of 112 µm), with a ridge on those features."""
    if "xbase" not in _MODELS:
        a = _base()
        enc = _tiny_encoder()
        si.pp.embed(a, enc, patch_px=16, cache=False, progress=False, key_added="X_tiny")
        ridge = si.models.RidgeRegressor(n_components=3).fit(a, "X_tiny", genes=list(a.var_names[:3]))
        _MODELS["xbase"] = (a, enc, ridge)
    return _MODELS["xbase"][0].copy()


def _grid_seg(image, *, mpp):
    lab = np.zeros(image.shape[:2], np.int32)
    for k, y in enumerate(range(1, image.shape[0] - 3, 5)):
        lab[y:y + 3, 1:4] = k + 1
    return lab


def _explain(spot: int = 0, model: Any = None, **kw):
    def call(a):
        _, enc, ridge = _MODELS["xbase"]
        kw2 = {"spots": [a.obs_names[spot]] if a.n_obs else [], "encoder": enc, "segmenter": _grid_seg,
               "n_samples": 12, "progress": False, **kw}
        return si.tl.explain(a, ridge if model is None else model, **kw2)
    return call


def _align_setup():
    a = _base()
    si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic", genes=a.var_names)
    return a


def _untrained_align(a):
    return si.tl.align(a, si.models.ContrastiveAligner(a, n_latent=4, image_hidden=8, gene_hidden=8))


def _xmod(fn: Callable) -> Callable:
    return _mod(fn, _xbase)


def _annotate(**kw):
    return lambda a: si.tl.annotate(a, "pathologist", **{"n_new": 5, "seed": 0, "max_epochs": 2, **kw})


def _labels(a, frac=3):
    a.obs["pathologist"] = a.obs["cell_type"].astype(str).where(np.arange(a.n_obs) % frac == 0)


def _loupe(content: str | bytes | None, **kw):
    def call(a):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "labels.csv"
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif content is not None:
                path.write_text(content.format(*a.obs_names[:2]))
            return si.io.read_loupe(a, path, **{"key_added": "loupe", **kw})
    return call


def _tif(kind: str, **kw):
    def call(_):
        import tempfile
        from pathlib import Path

        import tifffile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "slide.tif"
            img = np.full((64, 64, 3), 200, np.uint8)
            if kind == "junk":
                path.write_bytes(b"not a slide at all")
            elif kind == "empty":
                path.write_bytes(b"")
            elif kind == "gray":
                tifffile.imwrite(path, img[..., 0], resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
            elif kind == "rgba":
                tifffile.imwrite(path, np.dstack([img, img[..., :1]]), photometric="rgb", extrasamples=[2],
                                 resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
            elif kind == "dir":
                path = Path(d)
            else:
                tifffile.imwrite(path, img, photometric="rgb")  # no pixel size
            out = si.io.read_wsi(path, **kw)
            next(iter(out.images.values()))  # the image element opens
            return out
    return call


def _first_free(ctx):
    return ctx.free[: ctx.budget]


def _registered(budget, fn=_first_free):
    """active_sample with ``fn`` registered under a name for the call only (the registry is left as found)."""
    def call(a):
        from stimg.models._sampling._base import SAMPLERS

        si.tl.register_sampler("_hardening", fn)
        try:
            return si.tl.active_sample(a, budget, method="_hardening", embedding_key="X_synthetic")
        finally:
            SAMPLERS.pop("_hardening")
    return call


def _sampler_returning(fn):
    return _registered(5, fn)


def _ctx(**kw):
    return lambda a: si.pp.spatial_context(a, "X_synthetic", **{"radius_um": 200.0, "method": "mean", **kw})


def _pseudo(**kw):
    return lambda a: si.pp.pseudo_spots(a, **{"size_um": 200.0, **kw})


def _grid_embed(**kw):
    kw = {"stride_um": 112.0, "patch_px": 16, "cache": False, "progress": False, **kw}
    return lambda a: si.pp.embed_grid(a, _tiny_encoder(), **kw)


def _no_mpp(a):
    for lib in a.uns["spatial"]:
        a.uns["spatial"][lib]["scalefactors"].pop("microns_per_pixel")
        a.uns["spatial"][lib]["scalefactors"].pop("spot_diameter_um", None)


def _no_scale(a):
    _no_mpp(a)
    for lib in a.uns["spatial"]:
        a.uns["spatial"][lib]["scalefactors"].pop("spot_diameter_fullres")


_UNTRAINED_MSG = (RuntimeError, "not trained")
CASES += [
    # ---- si.tl.align / si.tl.retrieve (ContrastiveAligner)
    Case("align-nan-emb", "tl.align", "NaN in the image features", _mod(lambda a: a.obsm["X_synthetic"].__setitem__(
        (2, 1), np.nan)), lambda a: si.tl.align(a, _aligner()), _NONFINITE),
    Case("align-missing-emb", "tl.align", "image features missing", _mod(lambda a: a.obsm.pop("X_synthetic")),
         lambda a: si.tl.align(a, _aligner()), (KeyError, "si.pp.embed")),
    Case("align-empty", "tl.align", "table with 0 spots (0-row latents)", _empty_obs,
         lambda a: si.tl.align(a, _aligner())),
    Case("align-genes-missing", "tl.align", "table lacks the model's genes (image side only, as documented)",
         lambda: _base()[:, 3:].copy(), lambda a: si.tl.align(a, _aligner())),
    Case("align-dup", "tl.align", "duplicate obs_names", _mod(_dup_names), lambda a: si.tl.align(a, _aligner()),
         warns="obs_names_make_unique"),
    Case("align-untrained", "tl.align", "untrained model", _align_setup, _untrained_align, _UNTRAINED_MSG),
    Case("retrieve-nan-emb", "tl.retrieve", "inf in the image features", _mod(_inf_emb),
         lambda a: si.tl.retrieve(a, _aligner()), _NONFINITE),
    Case("retrieve-empty", "tl.retrieve", "table with 0 spots", _empty_obs, lambda a: si.tl.retrieve(a, _aligner()),
         (ValueError, "nothing to predict|no spots")),
    Case("retrieve-k-pool", "tl.retrieve", "k larger than the reference bank (1000 of 60)", _base,
         lambda a: si.tl.retrieve(a, _aligner(), k=1000), warns="exceeds the 60 reference spots"),
    Case("retrieve-k-nan", "tl.retrieve", "k=NaN", _base,
         lambda a: si.tl.retrieve(a, _aligner(), k=float("nan")), (ValueError, "k must be a whole number")),
    Case("retrieve-k-frac", "tl.retrieve", "k=2.5", _base,
         lambda a: si.tl.retrieve(a, _aligner(), k=2.5), (ValueError, "k must be a whole number")),
    Case("retrieve-genes", "tl.retrieve", "gene not in the reference bank", _base,
         lambda a: si.tl.retrieve(a, _aligner(), genes=["nope"]), (KeyError, "not in the model's reference bank")),
    Case("retrieve-ref-nan", "tl.retrieve", "reference with a NaN count (that spot left out, as documented)", _base,
         lambda a: si.tl.retrieve(a, _aligner(), reference=_mod(_nan_X)())),
    Case("retrieve-ref-neg", "tl.retrieve", "reference with a negative count", _base,
         lambda a: si.tl.retrieve(a, _aligner(), reference=_mod(_neg_X)()), (ValueError, "negative")),
    Case("retrieve-ref-empty", "tl.retrieve", "reference with 0 spots", _base,
         lambda a: si.tl.retrieve(a, _aligner(), reference=_empty_obs()), (ValueError, "reference table has no spot .*pass a table")),
    Case("retrieve-zero-spots", "tl.retrieve", "reference with 3 spots without counts", _base,
         lambda a: si.tl.retrieve(a, _aligner(), reference=_mod(_zero_spots)())),
    Case("retrieve-dup", "tl.retrieve", "duplicate obs_names", _mod(_dup_names),
         lambda a: si.tl.retrieve(a, _aligner()), warns="obs_names_make_unique"),
    # ---- si.tl.annotate / si.io.read_loupe
    Case("annotate-missing-col", "tl.annotate", "labels_key not in .obs (round 0: nothing labelled yet)", _base,
         _annotate()),
    Case("annotate-n0", "tl.annotate", "n_new=0", _mod(_labels), _annotate(n_new=0), (ValueError, "n_new")),
    Case("annotate-pool", "tl.annotate", "n_new larger than the unlabelled pool (1000 of 40): all proposed",
         _mod(_labels), _annotate(n_new=1000)),
    Case("annotate-all-labelled", "tl.annotate", "every spot already labelled (nothing left to propose)",
         _mod(lambda a: _labels(a, 1)), _annotate()),
    Case("annotate-nan-emb", "tl.annotate", "NaN in the embedding", _mod(lambda a: (_labels(a), _inf_emb(a))),
         _annotate(), _NONFINITE),
    Case("annotate-empty", "tl.annotate", "table with 0 spots", lambda: _mod(_labels)()[:0].copy(), _annotate(),
         (ValueError, "no spots .*check the filtering")),
    Case("annotate-dup", "tl.annotate", "duplicate obs_names", _mod(lambda a: (_labels(a), _dup_names(a))),
         _annotate(), warns="obs_names_make_unique"),
    Case("annotate-one-class", "tl.annotate", "labels of a single class", _mod(
        lambda a: a.obs.__setitem__("pathologist", pd.Series(np.where(np.arange(a.n_obs) % 3 == 0, "tumour", None),
                                                             index=a.obs_names, dtype=object))), _annotate()),
    Case("annotate-int-labels", "tl.annotate", "integer class labels with NaN for unlabelled", _mod(
        lambda a: a.obs.__setitem__("pathologist", np.where(np.arange(a.n_obs) % 3 == 0, np.arange(a.n_obs) % 2,
                                                            np.nan))), _annotate()),
    Case("loupe-missing", "io.read_loupe", "file does not exist", _base, _loupe(None),
         (FileNotFoundError, "labels.csv")),
    Case("loupe-empty", "io.read_loupe", "empty file", _base, _loupe(""), (si.io.LoupeFormatError, "is empty")),
    Case("loupe-header", "io.read_loupe", "no Barcode column", _base, _loupe("Spot,label\n{0},a\n"),
         (si.io.LoupeFormatError, "no 'Barcode' column")),
    Case("loupe-unknown", "io.read_loupe", "barcodes not in the table", _base,
         _loupe("Barcode,label\n{0},a\nTTTT-1,b\n"), (KeyError, "TTTT-1")),
    Case("loupe-binary", "io.read_loupe", "binary (non-UTF-8) file", _base, _loupe(b"Barcode,label\n\xff\xfe\x00\n"),
         (si.io.LoupeFormatError, "not UTF-8")),
    Case("loupe-dup-names", "io.read_loupe", "duplicate obs_names", _mod(_dup_names),
         _loupe("Barcode,label\ndup,a\n"), (ValueError, "barcode_key=")),
    Case("loupe-empty-table", "io.read_loupe", "table with 0 spots", _empty_obs,
         _loupe("Barcode,label\nAAAC-1,a\n"), (KeyError, "AAAC-1")),
    Case("loupe-blank-labels", "io.read_loupe", "a row with an empty label", _base,
         _loupe("Barcode,label\n{0},a\n{1},\n")),
    # ---- si.tl.explain
    Case("explain-untrained", "tl.explain", "untrained model", _xbase,
         _explain(model=si.models.RidgeRegressor(n_components=3)), _UNTRAINED_MSG),
    Case("explain-no-spots", "tl.explain", "spots=[]", _xbase, _explain(spots=[]), (ValueError, "spots")),
    Case("explain-nan-xy", "tl.explain", "NaN coordinates of the spot explained", _xmod(_nan_xy),
         _explain(spot=3), (ValueError, "non-finite .*coordinates")),
    Case("explain-off-image", "tl.explain", "spot far outside the image", _xmod(_off_image),
         _explain(spot=4), (ValueError, "outside")),
    Case("explain-gray", "tl.explain", "grayscale 2-D image", _xmod(_image(lambda i: i.mean(-1).astype(np.uint8))),
         _explain(), warns="grayscale"),
    Case("explain-rgba", "tl.explain", "RGBA image", _xmod(_image(
        lambda i: np.dstack([i, np.full(i.shape[:2], 255, np.uint8)]))), _explain()),
    Case("explain-dup", "tl.explain", "duplicate obs_names, spot given by a repeated name", _xmod(_dup_names),
         _explain(spots=["dup"]), (ValueError, r"more than once .*obs_names_make_unique\(\)")),
    Case("explain-empty", "tl.explain", "table with 0 spots", lambda: _xbase()[:0].copy(), _explain(),
         (ValueError, "selects no spot")),
    Case("explain-genes", "tl.explain", "gene the model does not predict", _xbase, _explain(genes=["nope"]),
         (KeyError, "not predicted by RidgeRegressor")),
    Case("explain-nan-emb", "tl.explain", "NaN in the stored features", _xmod(
        lambda a: a.obsm["X_tiny"].__setitem__((0, 0), np.nan)), _explain(), _NONFINITE),
    # ---- si.models.SCR2Net
    Case("scr2-nan-X", "models.SCR2Net", "NaN count", _mod(_nan_X), _scr2, _NONFINITE),
    Case("scr2-neg-X", "models.SCR2Net", "negative count", _mod(_neg_X), _scr2, (ValueError, "negative")),
    Case("scr2-zero-spots", "models.SCR2Net", "3 spots with no counts", _mod(_zero_spots), _scr2),
    Case("scr2-empty", "models.SCR2Net", "table with 0 spots", _empty_obs, _scr2, (ValueError, "table has no spots to train on")),
    Case("scr2-no-genes", "models.SCR2Net", "table with 0 genes", _no_genes, _scr2, (ValueError, "gene")),
    Case("scr2-genes", "models.SCR2Net", "unknown target gene", _base, lambda a: _scr2(a, genes=["nope"]),
         (KeyError, "nope")),
    Case("scr2-inf-emb", "models.SCR2Net", "inf in the embedding", _mod(_inf_emb), _scr2, _NONFINITE),
    Case("scr2-topk0", "models.SCR2Net", "top_k=0", _base, lambda a: _scr2(a, top_k=0), (ValueError, "top_k")),
    Case("scr2-topk-pool", "models.SCR2Net", "top_k larger than the training spots (capped, as documented)", _base,
         lambda a: _scr2(a, top_k=1000)),
    Case("scr2-train-none", "models.SCR2Net", "train_indices selects nothing", _base,
         lambda a: si.models.SCR2Net(a, "X_synthetic", target_key=None).train(
             max_epochs=1, train_indices=np.zeros(a.n_obs, bool), progress=False), (ValueError, "selects no spot")),
    Case("scr2-predict-untrained", "tl.predict_expression", "untrained SCR2Net", _base,
         lambda a: si.tl.predict_expression(a, _scr2net(train=False)), _UNTRAINED_MSG),
    Case("scr2-predict-no-emb", "tl.predict_expression", "SCR2Net, features missing",
         _mod(lambda a: a.obsm.pop("X_synthetic")), lambda a: si.tl.predict_expression(a, _scr2net()),
         (KeyError, "si.pp.embed")),
    Case("scr2-predict-empty", "tl.predict_expression", "SCR2Net, table with 0 spots", _empty_obs,
         lambda a: si.tl.predict_expression(a, _scr2net()), (ValueError, "nothing to predict")),
    Case("scr2-predict-nan", "tl.predict_expression", "SCR2Net, inf in the features", _mod(_inf_emb),
         lambda a: si.tl.predict_expression(a, _scr2net()), _NONFINITE),
    Case("scr2-predict-dup", "tl.predict_expression", "SCR2Net, duplicate obs_names", _mod(_dup_names),
         lambda a: si.tl.predict_expression(a, _scr2net()), warns="obs_names_make_unique"),
    # ---- si.pp.spatial_context
    Case("ctx-nan-xy", "pp.spatial_context", "NaN spot coordinates", _mod(_nan_xy), _ctx(),
         (ValueError, "non-finite .*coordinates")),
    Case("ctx-inf-emb", "pp.spatial_context", "inf in the embedding", _mod(_inf_emb), _ctx(), _NONFINITE),
    Case("ctx-radius-neg", "pp.spatial_context", "radius_um=-1", _base, _ctx(radius_um=-1.0),
         (ValueError, "non-negative")),
    Case("ctx-radius-nan", "pp.spatial_context", "radius_um=NaN", _base, _ctx(radius_um=float("nan")),
         (ValueError, "radius")),
    Case("ctx-empty", "pp.spatial_context", "table with 0 spots", _empty_obs, _ctx(), (ValueError, "no spots .*check the filtering")),
    Case("ctx-visium-scale", "pp.spatial_context", "no µm/px, spot diameter in px only (Visium 55 µm assumed)",
         _mod(_no_mpp), _ctx()),
    Case("ctx-no-scale", "pp.spatial_context", "no µm scale at all", _mod(_no_scale), _ctx(),
         (ValueError, "No µm scale .*microns_per_pixel")),
    Case("ctx-missing-emb", "pp.spatial_context", "embedding missing", _base,
         lambda a: si.pp.spatial_context(a, "X_nope", radius_um=200.0), (KeyError, "X_nope")),
    Case("ctx-dup", "pp.spatial_context", "duplicate obs_names", _mod(_dup_names), _ctx(),
         warns="obs_names_make_unique"),
    Case("ctx-str-emb", "pp.spatial_context", "string embedding", _mod(_str_emb), _ctx(),
         (TypeError, "must be numeric")),
    # ---- si.pp.pseudo_spots / si.pp.embed_grid
    Case("pseudo-nan-xy", "pp.pseudo_spots", "NaN unit coordinates", _mod(_nan_xy), _pseudo(),
         (ValueError, "non-finite")),
    Case("pseudo-nan-X", "pp.pseudo_spots", "NaN count", _mod(_nan_X), _pseudo(),
         (ValueError, "must be finite and non-negative .*raw-count layer")),
    Case("pseudo-size0", "pp.pseudo_spots", "size_um=0", _base, _pseudo(size_um=0), (ValueError, "positive")),
    Case("pseudo-size-nan", "pp.pseudo_spots", "size_um=NaN", _base, _pseudo(size_um=float("nan")),
         (ValueError, "positive")),
    Case("pseudo-empty", "pp.pseudo_spots", "table with 0 units", _empty_obs, _pseudo(),
         (ValueError, "no units .*check the filtering")),
    Case("pseudo-huge", "pp.pseudo_spots", "size_um=1e7 (one pseudo-spot per section)", _base,
         _pseudo(size_um=1e7, inplace=False)),
    Case("pseudo-no-mpp", "pp.pseudo_spots", "no pixel size in .uns", _mod(_no_mpp), _pseudo(), (ValueError, "µm")),
    Case("pseudo-dup", "pp.pseudo_spots", "duplicate obs_names", _mod(_dup_names), _pseudo(inplace=False),
         warns="obs_names_make_unique"),
    Case("grid-stride0", "pp.embed_grid", "stride_um=0", _base, _grid_embed(stride_um=0),
         (ValueError, "stride_um")),
    Case("grid-gray", "pp.embed_grid", "grayscale 2-D image", _mod(_image(lambda i: i.mean(-1).astype(np.uint8))),
         _grid_embed(), warns="grayscale"),
    Case("grid-empty", "pp.embed_grid", "table with 0 spots", _empty_obs, _grid_embed(),
         (ValueError, "no spots to embed; check the filtering")),
    Case("grid-off-image", "pp.embed_grid", "spot far outside the image", _mod(_off_image), _grid_embed(),
         (ValueError, "outside")),
    Case("grid-float01", "pp.embed_grid", "float image in [0, 1]", _mod(_image(lambda i: i / 255.0)), _grid_embed()),
    # ---- si.io.read_wsi
    Case("wsi-missing", "io.read_wsi", "file does not exist", lambda: None,
         lambda _: si.io.read_wsi("/nonexistent/slide.svs"), (FileNotFoundError, "does not exist")),
    Case("wsi-junk", "io.read_wsi", "not an image file", lambda: None, _tif("junk"), (ValueError, "Could not read")),
    Case("wsi-empty", "io.read_wsi", "empty file", lambda: None, _tif("empty"), (ValueError, "Could not read")),
    Case("wsi-dir", "io.read_wsi", "a directory", lambda: None, _tif("dir"), (ValueError, "is a directory; pass the")),
    Case("wsi-no-mpp", "io.read_wsi", "TIFF without pixel size", lambda: None, _tif("plain"),
         (ValueError, "no pixel size.*mpp=")),
    Case("wsi-mpp0", "io.read_wsi", "mpp=0", lambda: None, _tif("plain", mpp=0), (ValueError, "mpp must be a positive")),
    Case("wsi-mpp-nan", "io.read_wsi", "mpp=NaN", lambda: None, _tif("plain", mpp=float("nan")),
         (ValueError, "mpp must be a positive")),
    Case("wsi-gray", "io.read_wsi", "grayscale TIFF", lambda: None, _tif("gray")),
    Case("wsi-rgba", "io.read_wsi", "RGBA TIFF", lambda: None, _tif("rgba")),
    Case("wsi-backend", "io.read_wsi", "unknown backend", lambda: None, _tif("plain", mpp=0.5, backend="nope"),
         (ValueError, "backend")),
    # ---- si.tl.active_sample with a registered sampler
    Case("sampler-budget-0", "tl.active_sample", "registered sampler, budget=0", _base, _registered(0),
         (ValueError, "budget must be positive")),
    Case("sampler-budget-pool", "tl.active_sample", "registered sampler, budget > pool (61 of 60)", _base,
         _registered(61), (ValueError, "exceeds the 60 spots available")),
    Case("sampler-budget-all", "tl.active_sample", "registered sampler, budget = pool", _base, _registered(60)),
    Case("sampler-budget-frac", "tl.active_sample", "registered sampler, budget=0.5 (a fraction)", _base,
         _registered(0.5)),
    Case("sampler-too-few", "tl.active_sample", "sampler returns fewer spots than the budget", _base,
         _sampler_returning(lambda ctx: ctx.free[:2]), (ValueError, "returned 2 spots for a budget of 5")),
    Case("sampler-repeat", "tl.active_sample", "sampler returns a spot twice", _base,
         _sampler_returning(lambda ctx: np.array([1, 1, 2, 3, 4])), (ValueError, "more than once")),
    Case("sampler-range", "tl.active_sample", "sampler returns a position out of range", _base,
         _sampler_returning(lambda ctx: np.array([0, 1, 2, 3, 999])), (ValueError, "range|outside|not a free")),
    Case("sampler-float", "tl.active_sample", "sampler returns floats", _base,
         _sampler_returning(lambda ctx: np.array([0.5, 1, 2, 3, 4])), (TypeError, "integer")),
    Case("sampler-none", "tl.active_sample", "sampler returns None", _base,
         _sampler_returning(lambda ctx: None), (TypeError, "returned None|integer")),
    Case("sampler-raises", "tl.active_sample", "sampler raises", _base,
         _sampler_returning(lambda ctx: 1 / 0), (ZeroDivisionError, "division by zero")),
    Case("sampler-nan-xy", "tl.active_sample", "registered sampler, NaN spot coordinates", _mod(_nan_xy),
         _registered(5), _NONFINITE),
    Case("sampler-empty", "tl.active_sample", "registered sampler, table with 0 spots", _empty_obs, _registered(5),
         (ValueError, "no spots .*check the filtering")),
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
