"""``stimg train`` (sections or a file with counts + images → model file) and ``stimg predict`` (a slide without ST)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

MODELS = ("nb-ensemble", "ridge")


def add_parsers(sub) -> None:
    """Add the ``train`` and ``predict`` sub-commands."""
    t = sub.add_parser(
        "train", help="train a model on ST sections and save it to one portable model file",
        description="Train an expression model on spatial-transcriptomics sections (HER2ST names with --sections, or "
                    "an .h5ad/.zarr with raw counts and images with --data) and save it to one file that carries the "
                    "encoder, its weights fingerprint, patch µm/px, genes and calibration, for `stimg predict`.")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--sections", nargs="+", metavar="S", default=None,
                     help="HER2ST sections to train on (default: C2 C3 C4 C5 C6)")
    src.add_argument("--data", default=None,
                     help="SpatialData .zarr or AnnData .h5ad (scanpy .uns['spatial'] images) with raw counts")
    t.add_argument("--out", required=True, help="model file to write (e.g. her2st.stimg)")
    t.add_argument("--model", choices=MODELS, default="nb-ensemble", help="model (default: %(default)s)")
    t.add_argument("--members", type=int, default=5, help="NB ensemble members (default: %(default)s)")
    t.add_argument("--n-genes", type=int, default=50, help="highly variable target genes (default: %(default)s)")
    t.add_argument("--genes", nargs="+", default=None, help="explicit target genes (instead of --n-genes)")
    t.add_argument("--encoder", default="efficientnet_lite0", help="image encoder (default: %(default)s)")
    t.add_argument("--patch-um", type=float, default=112.0, help="patch side in µm (default: %(default)s)")
    t.add_argument("--patch-px", type=int, default=None, help="patch side in pixels (default: the encoder's input)")
    t.add_argument("--min-tissue", type=float, default=0.5, help="tissue QC threshold, 0 disables (default: %(default)s)")
    t.add_argument("--library-key", default="library_id", help="obs column of sections (default: %(default)s)")
    t.add_argument("--no-calibrate", action="store_true",
                   help="skip conformal calibration of the NB intervals (leave-one-section-out)")
    t.add_argument("--datadir", default=None, help="data folder holding her2st/ (default: STIMG_DATA_DIR)")
    t.add_argument("--cache-dir", default=None, help="feature cache folder")
    t.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("--quiet", action="store_true", help="log warnings only")
    t.set_defaults(run=train)

    p = sub.add_parser(
        "predict", help="predict expression and uncertainty on a whole-slide image without ST",
        description="Tile a slide (SVS, NDPI, TIFF/OME-TIFF; tissue tiles only), embed the tiles with the model's "
                    "encoder and patch size, predict with a model file written by `stimg train`, and write a "
                    "SpatialData .zarr (tiles, table with .layers and uncertainty) and per-gene heat maps.")
    p.add_argument("slide", help="whole-slide image file")
    p.add_argument("--model", required=True, help="model file written by `stimg train` (or any stimg model's .save)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of the slide, required when its metadata has none")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile (default: %(default)s)")
    p.add_argument("--genes", nargs="+", default=None, help="genes to draw (default: all the model predicts)")
    p.add_argument("--backend", choices=("tiffslide", "openslide"), default=None, help="slide reader (default: tiffslide)")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/tiles.zarr")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    p.set_defaults(run=predict)


class _Bar:
    """The command's one progress bar over named steps."""

    def __init__(self, desc: str, steps: list[str], show: bool) -> None:
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=len(steps), desc=desc, file=sys.stderr,
                            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed} [{postfix}]")

    def step(self, name: str) -> None:
        if self.bar is not None:
            if self.bar.postfix:
                self.bar.update(1)
            self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.set_postfix_str("done")
            self.bar.close()


def _setup(args: argparse.Namespace):
    import stimg as si

    if getattr(args, "datadir", None):
        si.settings.datadir = args.datadir
    if args.quiet:
        si.settings.verbosity = 1
    si.settings.progress = False
    return si


def _read_training_data(si, args: argparse.Namespace):
    if args.data is None:
        from . import DEMO_SECTIONS

        return si.datasets.her2st(args.sections or DEMO_SECTIONS)
    path = Path(args.data)
    if not path.exists():
        msg = f"--data {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    if path.suffix == ".h5ad":
        import anndata as ad

        return ad.read_h5ad(path)
    import spatialdata as sd

    return sd.read_zarr(path)


def train(args: argparse.Namespace) -> int:
    """``stimg train``: returns the exit status."""
    from .._spatial import get_table
    from .._utils import warn

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"stimg train: {out} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    if args.model == "nb-ensemble" and args.members < 2:
        print("stimg train: --members must be ≥ 2.", file=sys.stderr)
        return 2
    si = _setup(args)
    t0 = time.perf_counter()
    calibrate = args.model == "nb-ensemble" and not args.no_calibrate
    bar = _Bar("stimg train", ["read", "tissue QC", "embed", "genes", "fit", *(["calibrate"] if calibrate else []),
                               "save"], show=not args.no_progress)
    try:
        bar.step("read")
        data = _read_training_data(si, args)
        table = get_table(data)
        bar.step("tissue QC")
        if args.min_tissue > 0:
            si.pp.tissue_coverage(data, size_um=args.patch_um, min_coverage=args.min_tissue)
            table = get_table(data)
        bar.step("embed")
        si.pp.embed(data, args.encoder, patch_um=args.patch_um, patch_px=args.patch_px, cache_dir=args.cache_dir,
                    progress=False)
        key = f"X_{args.encoder}"
        bar.step("genes")
        if args.genes:
            genes = list(args.genes)
        else:
            genes = list(si.pp.select_genes(table, args.n_genes, method="hvg", inplace=False))
        bar.step("fit")
        if args.model == "ridge":
            model = si.models.RidgeRegressor().fit(table, key, genes=genes)
        else:
            si.models.NBRegressor.setup_anndata(table, embedding_key=key, genes=genes)
            model = si.models.NBEnsemble(table, n_members=args.members)
            model.train(progress=False)
            if calibrate:
                bar.step("calibrate")
                n_sec = table.obs[args.library_key].nunique() if args.library_key in table.obs else 0
                if n_sec >= 2:
                    model.calibrate(args.library_key, progress=False)
                else:
                    warn(f"{n_sec} section(s) in .obs[{args.library_key!r}]: intervals stay uncalibrated "
                                   "(cross-conformal calibration needs ≥ 2 sections).")
        bar.step("save")
        path = model.save(out, overwrite=args.overwrite)
    finally:
        bar.close()
    cal = getattr(model, "calibration_", None)
    print(f"stimg train: {type(model).__name__} on {table.n_obs} spots, {len(genes)} genes, {args.encoder} features "
          f"of {args.patch_um:g} µm patches; intervals {'calibrated (' + cal.method + '-conformal)' if cal else 'uncalibrated'}"
          f"\n  wrote {path} ({Path(path).stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return 0


def model_provenance(model: Any) -> dict[str, Any]:
    """Embedding provenance recorded in a trained or loaded model (encoder, patch µm/px, key, dim)."""
    prov = getattr(model, "embedding_provenance_", None)
    if prov is None and hasattr(model, "members"):
        prov = getattr(model.members[0], "embedding_provenance_", None)
    if not prov or not prov.get("encoder"):
        msg = (f"the {type(model).__name__} file records no image encoder, so the slide cannot be embedded the same "
               "way; re-train it with `stimg train` (features from si.pp.embed).")
        raise ValueError(msg)
    return prov


def predict(args: argparse.Namespace) -> int:
    """``stimg predict``: returns the exit status."""
    out = Path(args.out)
    zarr_path = out / "tiles.zarr"
    if zarr_path.exists() and not args.overwrite:
        print(f"stimg predict: {zarr_path} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    si = _setup(args)
    t0 = time.perf_counter()
    bar = _Bar("stimg predict", ["load model", "read slide", "tile", "embed", "predict", "write", "heat maps"],
               show=not args.no_progress)
    try:
        bar.step("load model")
        model = si.models.load_model(args.model)
        prov = model_provenance(model)
        genes = list(model.genes_ if hasattr(model, "genes_") else model.var_names_)
        show = genes if args.genes is None else list(args.genes)
        if missing := sorted(set(show) - set(genes)):
            bar.close()
            print(f"stimg predict: the model does not predict {missing[:5]}; it predicts e.g. {genes[:5]}.",
                  file=sys.stderr)
            return 2
        bar.step("read slide")
        try:
            slide = si.io.read_wsi(args.slide, mpp=args.mpp, backend=args.backend)
        except (ValueError, FileNotFoundError) as e:
            bar.close()
            print(f"stimg predict: {e}", file=sys.stderr)
            return 2
        bar.step("tile")
        tiles = si.pp.tile_image(slide, prov["patch_um"], min_tissue=args.min_tissue, genes=genes)
        bar.step("embed")
        si.pp.embed(tiles, prov["encoder"], patch_um=prov["patch_um"], patch_px=prov["patch_px"],
                    batch_size=args.batch_size, key_added=prov["embedding_key"], progress=False)
        bar.step("predict")
        si.tl.predict_expression(tiles, model)
        bar.step("write")
        table = tiles.tables["table"]
        out.mkdir(parents=True, exist_ok=True)
        written = _write_tiles(tiles, zarr_path, args, slide.attrs["stimg_wsi"])
        bar.step("heat maps")
        pngs = _heatmaps(si, tiles, show, out / "heatmaps")
    finally:
        bar.close()
    wsi = slide.attrs["stimg_wsi"]
    unc = "aleatoric + epistemic" if "si_epistemic" in table.layers else ("aleatoric" if "si_aleatoric" in table.layers
                                                                          else "none")
    print(f"stimg predict: {Path(args.slide).name} ({wsi['level_shapes'][0][1]}×{wsi['level_shapes'][0][0]} px, "
          f"{wsi['mpp']:g} µm/px): {table.n_obs} tissue tiles of {prov['patch_um']:g} µm, {len(genes)} genes, "
          f"uncertainty: {unc}\n  wrote {written} and {len(pngs)} heat maps in {out / 'heatmaps'} "
          f"({time.perf_counter() - t0:.1f}s)")
    return 0


def _write_tiles(tiles, path: Path, args: argparse.Namespace, wsi: dict) -> Path:
    """Tiles (shapes) and the prediction table as SpatialData zarr; the slide itself stays in its file."""
    import shutil

    from spatialdata import SpatialData

    if path.exists() and args.overwrite:
        shutil.rmtree(path)
    out = SpatialData(shapes=dict(tiles.shapes), tables=dict(tiles.tables))
    out.attrs["stimg_wsi"] = {k: list(map(list, v)) if k == "level_shapes" else v for k, v in wsi.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")  # zarr's note on a future default
        out.write(path)
    return path


def _heatmaps(si, tiles, genes: list[str], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for g in [*genes, "si_uncertainty"]:
        table = tiles.tables["table"]
        if g == "si_uncertainty" and g not in table.obs:
            continue
        fig, ax = plt.subplots(figsize=(6, 6))
        layer = None if g == "si_uncertainty" else "si_pred"
        si.pl.spatial(tiles, g, layer=layer, shape="square", alpha=0.6, crop=False, ax=ax,
                      cmap="magma" if layer is None else "viridis",
                      title=f"{g}: {'predictive variance' if layer is None else 'predicted expression'}")
        fig.tight_layout()
        p = folder / f"{g}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)
    return paths
