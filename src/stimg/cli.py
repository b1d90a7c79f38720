"""Command line: ``stimg demo`` runs the main job end to end on the real HER2ST data."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_DEMO_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]

_DEMO_HELP = """\
Predict spatial gene expression from H&E on real data, offline, on a CPU in minutes:

  1. read HER2ST sections (legacy ST, Andersson et al. 2021) from STIMG_DATA_DIR / --datadir,
  2. tissue QC: drop spots with < --min-tissue tissue under them (Otsu on saturation),
  3. embed a 112 µm patch per spot with the offline ImageNet EfficientNet-Lite0 (features cached),
  4. choose --n-genes highly variable genes on the training sections only,
  5. fit the ridge baseline (standardise, PCA, ridge with section-grouped CV) on the training sections,
  6. predict the held-out --test-section, print PCC/MSE/MAE and the best genes,
  7. write metrics (CSV) and a figure of measured vs predicted expression to --out.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stimg", description="stimg: spatial gene expression from H&E histology.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="train on HER2ST sections, predict a held-out one, report metrics",
                       description=_DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--sections", nargs="+", default=_DEMO_SECTIONS, metavar="S",
                   help="HER2ST sections with images to use (default: %(default)s)")
    d.add_argument("--test-section", default=None, metavar="S",
                   help="held-out section to predict (default: the last of --sections)")
    d.add_argument("--encoder", default="efficientnet_lite0",
                   help="image encoder (see stimg.encoders.list_encoders(); default: %(default)s, offline)")
    d.add_argument("--n-genes", type=int, default=50, help="number of target genes (default: %(default)s)")
    d.add_argument("--patch-um", type=float, default=112.0, help="patch side in µm (default: %(default)s)")
    d.add_argument("--patch-px", type=int, default=None,
                   help="patch side in pixels fed to the encoder (default: the encoder's input, 224)")
    d.add_argument("--min-tissue", type=float, default=0.5,
                   help="minimum tissue fraction under a spot, 0 disables QC (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=None, help="encoder batch size (default: stimg.settings)")
    d.add_argument("--out", default="stimg_demo", help="output folder (default: %(default)s)")
    d.add_argument("--cache-dir", default=None,
                   help="feature cache folder; repeated runs skip the encoder (default: OUT/feature_cache)")
    d.add_argument("--datadir", default=None, help="data folder holding her2st/ (default: STIMG_DATA_DIR)")
    d.add_argument("--n-show", type=int, default=3, help="genes shown in the figure (default: %(default)s)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def _metric(res, group: str, metric: str) -> float:
    return float(res.query("group == @group and metric == @metric")["value"].iloc[0])


def demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    import numpy as np

    import stimg as si

    t0 = time.perf_counter()
    if args.datadir:
        si.settings.datadir = args.datadir
    si.settings.progress = not args.no_progress
    if args.quiet:
        si.settings.verbosity = 1
    sections = list(dict.fromkeys(args.sections))
    test = args.test_section or sections[-1]
    if test not in sections:
        sections.append(test)
    train = [s for s in sections if s != test]
    if not train:
        print("stimg demo: need at least one training section besides the test section.", file=sys.stderr)
        return 2
    if args.n_genes < 1:
        print("stimg demo: --n-genes must be ≥ 1.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "feature_cache"

    steps = ["read", "tissue QC", "embed", "genes", "fit", "predict", "figure"]
    bar = si._utils.progress_bar(range(len(steps)), desc="stimg demo", total=len(steps), progress=not args.no_progress)
    it = iter(bar)

    def step(name: str) -> None:
        next(it, None)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)

    step("read")
    sdata = si.datasets.her2st(sections)
    table = sdata.tables["table"]
    n_read = table.n_obs
    step("tissue QC")
    if args.min_tissue > 0:
        si.pp.tissue_coverage(sdata, size_um=args.patch_um, min_coverage=args.min_tissue)
        table = sdata.tables["table"]
    step("embed")
    t_emb = time.perf_counter()
    si.pp.embed(sdata, args.encoder, patch_um=args.patch_um, patch_px=args.patch_px, batch_size=args.batch_size,
                cache_dir=cache_dir,
                progress=not args.no_progress)
    t_emb = time.perf_counter() - t_emb
    key = f"X_{args.encoder}"
    step("genes")
    lib = table.obs["library_id"].astype(str)
    train_mask, test_mask = lib.isin(train).to_numpy(), (lib == test).to_numpy()
    si.pp.select_genes(table, args.n_genes, method="hvg", subset=train)
    step("fit")
    model = si.models.RidgeRegressor().fit(table, key, train_indices=train_mask)
    step("predict")
    si.tl.predict_expression(table, model)
    res = si.tl.evaluate(table, mask=test_mask)
    per_gene = res.attrs["per_gene"]
    res.to_csv(out / "metrics.csv", index=False)
    per_gene.to_csv(out / "per_gene_pcc.csv")
    top = per_gene[test].dropna().sort_values(ascending=False)
    step("figure")
    import matplotlib.pyplot as plt

    table.layers["log1p"] = np.log1p(table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X))
    genes = list(top.index[: max(1, args.n_show)])
    fig, axs = plt.subplots(2, len(genes), figsize=(4.2 * len(genes), 8.2), squeeze=False)
    for j, g in enumerate(genes):
        vals = np.r_[table[test_mask, g].layers["log1p"].ravel(), table[test_mask, g].layers["si_pred"].ravel()]
        vmin, vmax = float(np.nanmin(vals)), float(np.nanmax(vals))
        si.pl.spatial(sdata, g, layer="log1p", library_id=test, ax=axs[0, j], vmin=vmin, vmax=vmax,
                      title=f"{g} measured (log1p)")
        si.pl.spatial(sdata, g, layer="si_pred", library_id=test, ax=axs[1, j], vmin=vmin, vmax=vmax,
                      title=f"{g} predicted, PCC {top[g]:.2f}")
    fig.suptitle(f"HER2ST {test}: ridge on {args.encoder} features, trained on {', '.join(train)}")
    fig.tight_layout()
    fig_path = out / f"demo_{test}_spatial.png"
    fig.savefig(fig_path, dpi=110)
    plt.close(fig)
    del table.layers["log1p"]
    next(it, None)
    if hasattr(bar, "close"):
        bar.close()

    wall = time.perf_counter() - t0
    lines = [
        "",
        f"stimg demo — HER2ST, train {', '.join(train)} → test {test}",
        f"  spots: {n_read} read, {table.n_obs} after tissue QC (≥ {args.min_tissue:.0%}); "
        f"test spots {int(test_mask.sum())}",
        f"  encoder: {args.encoder}, {args.patch_um:g} µm patches of {table.uns[key]['params']['patch_px']} px, "
        f"{table.obsm[key].shape[1]}-d "
        f"({table.uns[key]['params']['n_from_cache']} spots from cache, embed {t_emb:.1f}s)",
        f"  ridge: PCA {model.n_components_}, alpha {model.alpha_:g} ({model.cv_scheme_}), {len(model.var_names_)} genes",
        "",
        f"  {'metric':<28}{'value':>10}",
        f"  {'mean PCC over genes':<28}{_metric(res, test, 'pcc'):>10.3f}",
        f"  {'pooled PCC':<28}{_metric(res, 'all', 'pcc_pooled'):>10.3f}",
        f"  {'MSE (log1p)':<28}{_metric(res, test, 'mse'):>10.3f}",
        f"  {'MAE (log1p)':<28}{_metric(res, test, 'mae'):>10.3f}",
        f"  {'constant genes (excluded)':<28}{int(_metric(res, test, 'n_constant')):>10d}",
        "",
        "  top-10 genes by PCC:",
    ]
    lines += [f"    {i + 1:>2}. {g:<12}{v:>7.3f}" for i, (g, v) in enumerate(top.head(10).items())]
    lines += ["", f"  wrote {out / 'metrics.csv'}, {out / 'per_gene_pcc.csv'}, {fig_path}",
              f"  wall time {wall:.1f}s"]
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stimg`` command.

    Examples
    --------
    >>> from stimg.cli import main
    >>> main(["demo", "--help"])  # doctest: +SKIP
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        return demo(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
