"""Nucleus-level explanations of predicted expression: LIME over nuclei, saliency, integrated gradients."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._settings import settings
from .._spatial import get_table, is_spatialdata, library_column
from .._utils import progress_bar, warn

EXPLAIN_KEY = "si_explain"
METHODS = ("lime", "saliency", "integrated_gradients")


def _resolve_spots(table, spots) -> np.ndarray:
    """Rows of ``spots``: obs names, integer positions, a boolean mask or a boolean ``.obs`` column."""
    n = table.n_obs
    if spots is None:
        return np.arange(n)
    if isinstance(spots, str):
        if spots in table.obs.columns:
            col = table.obs[spots]
            if col.dtype != bool:
                msg = f".obs[{spots!r}] must be boolean to select spots, got {col.dtype}."
                raise TypeError(msg)
            rows = np.flatnonzero(col.to_numpy())
        else:
            spots = [spots]
    if not isinstance(spots, str):
        arr = np.asarray(list(spots) if not isinstance(spots, np.ndarray) else spots)
        if arr.dtype == bool:
            if arr.shape != (n,):
                msg = f"a boolean spots mask must have one entry per spot ({n}), got shape {arr.shape}."
                raise ValueError(msg)
            rows = np.flatnonzero(arr)
        elif arr.size and np.issubdtype(arr.dtype, np.integer):
            rows = arr.astype(np.int64)
            if rows.min() < -n or rows.max() >= n:
                msg = f"spot positions must lie in [0, {n}), got range [{rows.min()}, {rows.max()}]."
                raise IndexError(msg)
            rows = np.where(rows < 0, rows + n, rows)
        else:
            names = pd.Index(arr.astype(str))
            if not table.obs_names.is_unique:
                _refuse_duplicate_names(table)
            pos = table.obs_names.get_indexer(names)
            if (pos < 0).any():
                bad = list(names[pos < 0][:3])
                msg = (f"{int((pos < 0).sum())} spots are not in the table (e.g. {bad}); pass obs names, "
                       f"positions or a boolean mask (obs names look like {list(table.obs_names[:2])}).")
                raise KeyError(msg)
            rows = pos
    rows = np.asarray(pd.unique(np.asarray(rows, dtype=np.int64)))
    if rows.size == 0:
        msg = "spots selects no spot; pass at least one obs name, position or a non-empty mask."
        raise ValueError(msg)
    if not table.obs_names.is_unique and table.obs_names.duplicated(keep=False)[rows].any():
        _refuse_duplicate_names(table)
    return rows


def _refuse_duplicate_names(table) -> None:
    dup = list(table.obs_names[table.obs_names.duplicated()].unique()[:3])
    msg = (f"table.obs_names occur more than once (e.g. {dup}) and explanations are stored by spot name; run "
           "adata.obs_names_make_unique() first.")
    raise ValueError(msg)


def _hide_color(patch: np.ndarray, labels: np.ndarray, hide_color) -> np.ndarray:
    if not isinstance(hide_color, str):
        return np.asarray(hide_color, np.uint8)
    from skimage.color import rgb2gray

    free = labels == 0
    tissue = free & (rgb2gray(patch) < 0.8)
    pick = tissue if tissue.sum() >= 16 else free
    if pick.sum() == 0:
        return np.array([255, 255, 255], np.uint8)
    return np.median(patch[pick], axis=0).astype(np.uint8)


def _check_hide(hide_color) -> None:
    if isinstance(hide_color, str):
        if hide_color != "tissue":
            msg = f"hide_color must be 'tissue' or an RGB triple of 0–255, got {hide_color!r}."
            raise ValueError(msg)
        return
    arr = np.asarray(hide_color)
    if arr.shape != (3,) or not np.all((arr >= 0) & (arr <= 255)):
        msg = f"hide_color must be 'tissue' or an RGB triple of 0–255, got {hide_color!r}."
        raise ValueError(msg)


def _patch_labels(crop_labels: np.ndarray, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop labels mapped onto the patch grid: ``(labels 1 … k, crop id of each)``.

    Nearest-neighbour resampling, then each nucleus grows by one pixel so hiding it also hides the
    rim that resizing blurred.
    """
    from skimage.segmentation import expand_labels

    w = crop_labels.shape[0]
    idx = np.minimum(((np.arange(patch_px) + 0.5) * w / patch_px).astype(int), w - 1)
    lab = expand_labels(crop_labels[np.ix_(idx, idx)], distance=1)
    ids = np.unique(lab)
    ids = ids[ids > 0].astype(np.int64)
    lut = np.zeros(int(crop_labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)  # order kept: new label j is crop nucleus ids[j - 1]
    return lut[lab], ids


def _polygons(crop_labels: np.ndarray, ids: np.ndarray, x0: int, y0: int):
    """Outline of each nucleus as a shapely polygon in image pixels."""
    from shapely.geometry import Point, Polygon
    from skimage.measure import find_contours

    out = []
    for i in ids:
        m = np.pad(crop_labels == i, 1)
        cs = find_contours(m.astype(np.uint8), 0.5)
        if not cs:
            out.append(Point(x0, y0).buffer(0.5))
            continue
        c = max(cs, key=len) - 1  # undo the padding
        poly = Polygon(np.c_[c[:, 1] + x0, c[:, 0] + y0]) if len(c) >= 4 else Point(x0 + c[0, 1], y0 + c[0, 0]).buffer(0.5)
        out.append(poly if poly.is_valid else poly.buffer(0))
    return out


@d.dedent
def explain(
    data: Any,
    model: Any,
    *,
    genes: str | Sequence[str] | None = None,
    spots: Any = None,
    method: str = "lime",
    n_samples: int = 1000,
    segmenter: str | Callable[..., np.ndarray] = "watershed",
    segmenter_kwargs: dict | None = None,
    hide_color: str | Sequence[int] = "tissue",
    kernel_width: float = 0.25,
    n_steps: int = 32,
    deletion_top: float | None = 0.1,
    n_random: int = 5,
    embedding_key: str | Sequence[str] | None = None,
    encoder: Any = None,
    stain: Callable | None = None,
    patch_um: float | None = None,
    patch_px: int | None = None,
    predict_kwargs: dict | None = None,
    batch_size: int | None = None,
    accelerator: str | None = None,
    amp: bool | None = None,
    seed: int | None = None,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    key_added: str = EXPLAIN_KEY,
    overwrite: bool = False,
    inplace: bool = True,
    progress: bool | None = None,
) -> dict[str, Any] | None:
    """Which nuclei drive a predicted gene: per-nucleus scores for chosen spots and genes (STImage).

    For each spot, the patch the model sees is cut, its nuclei are segmented
    (:func:`stimg.segmenters.segment_nuclei`, watershed on the haematoxylin channel by default) and
    every nucleus gets a score per gene:

    - ``'lime'`` (default; the ``lime`` package): ``n_samples`` copies of the patch, each with a
      random half of the nuclei replaced by the surrounding tissue colour, are passed **in batches**
      through the model's own encoder and the model; a locally weighted linear model (cosine
      kernel, ridge) of the prediction on which nuclei were kept gives each nucleus its weight.
      Pixels outside nuclei are never changed. Works for every model: frozen-feature models (ridge,
      NB regressor and ensemble, SCR²Net, ...) are explained through the encoder recorded in
      ``.uns[embedding_key]['params']`` by :func:`stimg.pp.embed` and their ordinary ``predict``.
    - ``'saliency'`` and ``'integrated_gradients'`` (captum) need a differentiable model: end-to-end
      models (:class:`~stimg.models.NBFinetuner`) or frozen-feature models with a torch head (NB
      regressor and ensemble, ridge), run as encoder → head. Gradients are taken on log1p of the
      predicted mean. Integrated gradients start from the patch with all nuclei hidden, so a
      nucleus's score is its share of the prediction difference; saliency scores a nucleus by
      gradient × (patch − hidden patch) summed over its pixels. Their pixel maps are kept too.

    Each explained patch is then checked: hiding the ``deletion_top`` fraction of nuclei with the
    highest scores should lower the prediction more than hiding random nuclei of equal total area.

    Parameters
    ----------
    %(data)s
    model
        A trained stimg model (anything with ``predict``), see above.
    genes
        Gene(s) to explain; ``None``: every gene the model predicts.
    spots
        Spots (or tiles) to explain: obs names, positions, a boolean mask or a boolean ``.obs``
        column; ``None``: all (LIME costs about ``n_samples`` encoder passes per spot).
    method
        ``'lime'``, ``'saliency'`` or ``'integrated_gradients'``.
    n_samples
        LIME perturbations per spot.
    segmenter
        A name of :func:`stimg.segmenters.list_segmenters` (``'watershed'``, ``'cellpose'``,
        ``'stardist'``) or a function ``(image, *, mpp) -> labels``. Nuclei are segmented on the
        full-resolution crop and mapped onto the model's patch grid.
    segmenter_kwargs
        Passed to the segmenter.
    hide_color
        How a hidden nucleus looks: ``'tissue'`` (median colour of the patch's non-nuclear
        tissue) or an RGB triple.
    kernel_width
        Width of LIME's exponential kernel on the cosine distance.
    n_steps
        Integration steps of integrated gradients.
    deletion_top
        Fraction of nuclei hidden by the faithfulness check (``None`` skips it).
    n_random
        Random equal-area draws of the check.
    embedding_key
        ``.obsm`` key(s) of the model's features; ``None``: what the model records.
    encoder
        Override the encoder rebuilt from the provenance (a name, module or
        :class:`~stimg.encoders.Encoder`): needed when the features came from a custom module.
    stain
        The stain normaliser the features were computed with (required when they were).
    patch_um, patch_px
        Override the patch size recorded with the features.
    predict_kwargs
        Passed to ``model.predict`` (e.g. ``library_size='reference'`` for NB models with a
        library-size offset).
    batch_size
        Patches per encoder pass; ``None`` uses :attr:`stimg.settings.batch_size`.
    accelerator
        Device of the encoder; ``None`` uses :attr:`stimg.settings.accelerator`.
    amp
        Mixed precision (``None``: on GPU only, as :func:`stimg.pp.embed`).
    seed
        Seed of the perturbations; ``None`` uses :attr:`stimg.settings.seed`.
    %(table_key)s
    %(library_key)s
    key_added
        Key of the result in ``.uns`` (and prefix of the SpatialData shapes elements).
    overwrite
        Replace an existing result under ``key_added``.
    %(inplace)s
    %(progress)s

    Returns
    -------
    With ``inplace=False`` the result dict, otherwise ``None`` and the table gets
    ``.uns[key_added]``, a dict of

    - ``'nuclei'``: one row per nucleus and spot (index ``'<spot>:<label>'``): ``spot``, ``label``
      (its id in ``'labels'``), centre ``x``, ``y`` in pixels of the section image, ``area_um2``,
      ``perimeter_um``, ``major_axis_um``, ``minor_axis_um``, ``eccentricity``, ``solidity``,
      ``haematoxylin`` (mean optical density) measured on the full-resolution crop;
    - ``'scores'``: the same rows, one column per gene;
    - ``'spots'``: one row per spot (section, window, number of nuclei, hide colour, and the
      cosine between the recomputed and the stored features of the unperturbed patch);
    - ``'summary'``: one row per spot and gene: ``prediction`` of the unperturbed patch,
      ``intercept``, ``fit`` (LIME R²; integrated-gradients completeness error), ``drop_top``,
      ``drop_random``, ``change_top``, ``change_random`` (the faithfulness check);
    - ``'labels'``: ``(n_spots, patch_px, patch_px)`` int32 nucleus labels on the patch grid;
    - ``'pixel_maps'``: ``(n_spots, n_genes, patch_px, patch_px)`` (gradient methods);
    - ``'params'``.

    SpatialData input also gets one shapes element per section, ``'<key_added>_<section>'``:
    nucleus outlines in the section image's coordinates with the morphology and one score column
    per gene (draw them over the H&E with spatialdata-plot).

    Examples
    --------
    >>> import stimg as si
    >>> sdata = si.datasets.her2st("C2")  # doctest: +SKIP
    >>> si.pp.embed(sdata)  # doctest: +SKIP
    >>> ridge = si.models.RidgeRegressor().fit(sdata, "X_efficientnet_lite0", genes=["ERBB2", "CD74"])  # doctest: +SKIP
    >>> si.tl.explain(sdata, ridge, genes=["ERBB2", "CD74"], spots=["C2_20x20"])  # doctest: +SKIP
    >>> si.pl.explain(sdata, "C2_20x20", genes=["ERBB2", "CD74"])  # doctest: +SKIP
    """
    start = time.perf_counter()
    from ..segmenters import get_segmenter, nucleus_morphology, segment_nuclei

    table = get_table(data, table_key)
    if method not in METHODS:
        msg = f"Unknown method {method!r}; choose one of {list(METHODS)}."
        raise KeyError(msg)
    if int(n_samples) < 10:
        msg = f"n_samples must be ≥ 10 LIME perturbations, got {n_samples!r}."
        raise ValueError(msg)
    if deletion_top is not None and not 0 < float(deletion_top) <= 1:
        msg = f"deletion_top must be a fraction in (0, 1] or None, got {deletion_top!r}."
        raise ValueError(msg)
    _check_hide(hide_color)
    get_segmenter(segmenter)
    rows = _resolve_spots(table, spots)
    shape_keys = []
    if inplace and not overwrite:
        if key_added in table.uns:
            msg = f"table.uns[{key_added!r}] exists; pass key_added= another name or overwrite=True."
            raise KeyError(msg)
    seed = int(settings.seed if seed is None else seed)
    bs = int(settings.batch_size if batch_size is None else batch_size)

    from ..pp import extract_patches
    from ._explain_engine import EXPLAINERS, FrozenFeaturePredictor, build_predictor, deletion_check

    pred = build_predictor(model, table, embedding_key=embedding_key, encoder=encoder, stain=stain,
                           patch_um=patch_um, patch_px=patch_px, batch_size=bs, accelerator=accelerator, amp=amp,
                           predict_kwargs=predict_kwargs)
    try:
        gene_list = list(pred.genes) if genes is None else ([genes] if isinstance(genes, str) else list(genes))
        missing = [g for g in gene_list if g not in pred.genes]
        if missing or not gene_list:
            msg = (f"genes {missing or gene_list} are not predicted by {type(model).__name__}; it predicts "
                   f"{len(pred.genes)} genes, e.g. {pred.genes[:5]}.")
            raise KeyError(msg)
        cols = [pred.genes.index(g) for g in gene_list]
        lib_key, lib_values = library_column(table, library_key)
        libs = list(pd.unique(lib_values.to_numpy()[rows]))
        if is_spatialdata(data) and inplace and not overwrite:
            shape_keys = [f"{key_added}_{lib}" for lib in libs]
            if clash := [k for k in shape_keys if k in data.shapes]:
                msg = f"sdata.shapes already has {clash}; pass key_added= another name or overwrite=True."
                raise KeyError(msg)
        ds = extract_patches(data, patch_um=pred.setup.patch_um, patch_px=pred.setup.patch_px, table_key=table_key,
                             library_id=libs if lib_key is not None else None, library_key=library_key,
                             stain=pred.setup.stain)
        item_of = {int(r): i for i, r in enumerate(ds.obs_index)}
        if no_img := [table.obs_names[r] for r in rows if int(r) not in item_of]:
            msg = f"{len(no_img)} spots have no image patch (e.g. {no_img[:3]}); explain spots of sections with an image."
            raise ValueError(msg)
        explainer = EXPLAINERS[method]
        seg_kwargs = dict(segmenter_kwargs or {})
        nuclei, scores, spot_rows, summary, labels_all, pix_all, polys = [], [], [], [], [], [], []
        for pos, r in enumerate(progress_bar(rows, desc=f"Explaining ({method})", total=len(rows), progress=progress)):
            i = item_of[int(r)]
            name = str(table.obs_names[r])
            crop, patch = ds.crop(i), ds.patch(i)
            mpp = float(ds.mpp[i])
            crop_lab = segment_nuclei(crop, mpp=mpp, method=segmenter, **seg_kwargs)
            lab, ids = _patch_labels(crop_lab, pred.setup.patch_px)
            morph = nucleus_morphology(crop_lab, mpp=mpp, image=crop).loc[ids]
            hide = _hide_color(patch, lab, hide_color)
            x0, y0, w = ds.window(i)
            k, g = int(lab.max()), len(cols)
            pred.last_features = None
            if k == 0:
                warn(f"no nuclei found in the patch of {name!r}; it gets no scores.")
                res = None
                yhat = pred.predict(_single(patch))[0, cols]
            else:
                res = explainer(pred, patch, lab, hide, cols, n_samples=int(n_samples), kernel_width=kernel_width,
                                n_steps=int(n_steps), batch_size=bs, seed=seed + pos)
                yhat = res.prediction
            check = (deletion_check(pred, patch, lab, hide, cols, res.scores, top=float(deletion_top),
                                    n_random=int(n_random), seed=seed + pos)
                     if res is not None and deletion_top is not None else {})
            if getattr(pred, "last_features", None) is None and isinstance(pred, FrozenFeaturePredictor):
                pred.predict(_single(patch))  # the feature check needs the unperturbed patch's features
            idx = [f"{name}:{j}" for j in range(1, k + 1)]
            m = morph.reset_index(drop=True)
            m.insert(0, "label", np.arange(1, k + 1))
            m.insert(0, "spot", name)
            m["x"] = m.pop("centroid_x") + x0
            m["y"] = m.pop("centroid_y") + y0
            m["area_px"] = np.bincount(lab.ravel(), minlength=k + 1)[1:]
            m.index = pd.Index(idx)
            nuclei.append(m)
            scores.append(pd.DataFrame(res.scores if res is not None else np.zeros((0, g)), index=idx,
                                       columns=gene_list))
            spot_rows.append({"spot": name, "library_id": str(lib_values.iloc[r]), "x0": x0, "y0": y0,
                              "window_px": w, "mpp": mpp, "n_nuclei": k, "hide_r": int(hide[0]),
                              "hide_g": int(hide[1]), "hide_b": int(hide[2]),
                              "feature_cosine": pred.feature_check(int(r))})
            for j, gname in enumerate(gene_list):
                summary.append({"spot": name, "gene": gname, "prediction": float(yhat[j]),
                                "intercept": float(res.intercept[j]) if res is not None else np.nan,
                                "fit": float(res.fit[j]) if res is not None else np.nan,
                                **{kk: float(v[j]) for kk, v in check.items()}})
            labels_all.append(lab)
            if method != "lime":
                pix_all.append(res.pixel_map if res is not None else np.zeros((g, *lab.shape), np.float32))
            if is_spatialdata(data) and inplace:
                polys.extend(_polygons(crop_lab, ids, x0, y0))
    finally:
        pred.close()

    spots_df = pd.DataFrame(spot_rows).set_index("spot", drop=False)
    spots_df.index.name = None
    cos = spots_df["feature_cosine"].to_numpy(float)
    if np.isfinite(cos).any() and np.nanmin(cos) < 0.99:
        warn(f"the features recomputed from {int((cos < 0.99).sum())} patches differ from the stored ones "
             f"(cosine down to {np.nanmin(cos):.3f}): the model may have been trained on other features, or "
             "stain=/patch settings differ; explanations may not reflect the stored predictions.")
    out: dict[str, Any] = {
        "nuclei": pd.concat(nuclei) if nuclei else pd.DataFrame(),
        "scores": pd.concat(scores) if scores else pd.DataFrame(columns=gene_list),
        "spots": spots_df,
        "summary": pd.DataFrame(summary),
        "labels": np.stack(labels_all).astype(np.int32),
        "params": {
            "method": method, "model": type(model).__name__, "genes": gene_list, "n_samples": int(n_samples),
            "segmenter": segmenter if isinstance(segmenter, str) else getattr(segmenter, "__name__", "custom"),
            "hide_color": hide_color if isinstance(hide_color, str) else [int(c) for c in hide_color],
            "kernel_width": float(kernel_width), "n_steps": int(n_steps),
            "deletion_top": None if deletion_top is None else float(deletion_top), "n_random": int(n_random),
            "patch_um": float(pred.setup.patch_um), "patch_px": int(pred.setup.patch_px),
            "embedding_key": list(getattr(pred, "keys", []) or []), "seed": seed, "table_key": table_key,
            "library_key": lib_key, "predictor": pred.kind,
        },
    }
    if pix_all:
        out["pixel_maps"] = np.stack(pix_all).astype(np.float32)
    logger.info("explained %d spots × %d genes (%s, %d nuclei) in %.1fs", len(rows), len(gene_list), method,
                len(out["nuclei"]), time.perf_counter() - start)
    if not inplace:
        return out
    if is_spatialdata(data):
        _add_shapes(data, out, polys, key_added)
    table.uns[key_added] = out
    log_added("uns", key_added, start)
    return None


def _single(patch: np.ndarray):
    from ._explain_engine import PerturbedPatches

    return PerturbedPatches(patch, np.zeros(patch.shape[:2], np.int64), np.zeros(3, np.uint8), np.ones((1, 0)))


def _add_shapes(sdata, out: dict, polys: list, key_added: str) -> None:
    """One shapes element of nucleus outlines per section, in the section image's coordinates."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    from .._spatial import sections

    nuc = out["nuclei"].join(out["scores"])
    if not len(nuc):
        return
    nuc = gpd.GeoDataFrame(nuc, geometry=polys)
    libs = out["spots"].set_index("spot")["library_id"]
    nuc["library_id"] = libs.loc[nuc["spot"]].to_numpy()
    table_key, lib_key = out["params"]["table_key"], out["params"]["library_key"]
    secs = {s.library_id: s for s in sections(sdata, table_key=table_key, library_id=list(pd.unique(nuc["library_id"])),
                                               library_key=lib_key)}
    for lib, part in nuc.groupby("library_id", sort=False):
        img = sdata.images[secs[lib].image_key]
        tr = get_transformation(img, get_all=True)
        el = ShapesModel.parse(part.drop(columns="library_id").copy(), transformations=tr)
        sdata.shapes[f"{key_added}_{lib}"] = el
        log_added("shapes", f"{key_added}_{lib}")
