"""Command line: ``stimg demo`` (the main job end to end on HER2ST), ``stimg train`` and ``stimg predict``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEMO_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]

_DEMO_HELP = """\
The mission on real data, offline, on a CPU in minutes (HER2ST, Andersson et al. 2021):

  1. read the sections (legacy ST, 100 µm spots) from STIMG_DATA_DIR / --datadir; tissue QC,
  2. embed a 112 µm patch per spot with the offline ImageNet EfficientNet-Lite0 (features cached),
     and add each spot's neighbours' mean within --context-um µm (spatial context),
  3. choose --n-genes highly variable genes on the training sections only,
  4. ridge baseline and a negative-binomial deep ensemble (--members), side by side on the test section,
  5. aleatoric and epistemic uncertainty maps; 80/90/95 % count intervals before and after conformal
     calibration (leave-one-training-section-out), with their measured coverage,
  6. active sampling: SCRL vs random and k-means at 10 % and 25 % of the training spots (budget curve),
  7. write tables, figures and a one-page report (report.md) to --out; print the table and the wall time.
"""


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="the main job end to end on HER2ST: predict, uncertainty, calibration, sampling",
                       description=_DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--sections", nargs="+", default=DEMO_SECTIONS, metavar="S",
                   help="HER2ST sections with images to use (default: %(default)s)")
    d.add_argument("--test-section", default=None, metavar="S",
                   help="held-out section to predict (default: the last of --sections)")
    d.add_argument("--encoder", default="efficientnet_lite0",
                   help="image encoder (see stimg.encoders.list_encoders(); default: %(default)s, offline)")
    d.add_argument("--n-genes", type=int, default=50, help="number of target genes (default: %(default)s)")
    d.add_argument("--members", type=int, default=3, help="NB ensemble members (default: %(default)s)")
    d.add_argument("--patch-um", type=float, default=112.0, help="patch side in µm (default: %(default)s)")
    d.add_argument("--patch-px", type=int, default=None,
                   help="patch side in pixels fed to the encoder (default: the encoder's input, 224)")
    d.add_argument("--context-um", type=float, default=500.0,
                   help="spatial context: each spot's features plus its neighbours' mean within this radius in µm "
                        "(si.pp.spatial_context); 0 uses the spot's own features only (default: %(default)s)")
    d.add_argument("--min-tissue", type=float, default=0.5,
                   help="minimum tissue fraction under a spot, 0 disables QC (default: %(default)s)")
    d.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25],
                   help="sampling budgets as fractions of the training spots (default: %(default)s)")
    d.add_argument("--seeds", type=int, default=3, help="seeds per sampling method and budget (default: %(default)s)")
    d.add_argument("--no-sampling", action="store_true", help="skip the active-sampling comparison")
    d.add_argument("--batch-size", type=int, default=None, help="encoder batch size (default: stimg.settings)")
    d.add_argument("--out", default="stimg_demo", help="output folder (default: %(default)s)")
    d.add_argument("--cache-dir", default=None,
                   help="feature cache folder; repeated runs skip the encoder (default: OUT/feature_cache)")
    d.add_argument("--datadir", default=None, help="data folder holding her2st/ (default: STIMG_DATA_DIR)")
    d.add_argument("--n-show", type=int, default=3, help="genes shown in the figure (default: %(default)s)")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    d.add_argument("--quiet", action="store_true", help="log warnings only")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stimg", description="stimg: spatial gene expression from H&E histology.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _demo_parser(sub)
    from ._slide import add_parsers

    add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stimg`` command.

    Examples
    --------
    >>> from stimg.cli import main
    >>> main(["demo", "--help"])  # doctest: +SKIP
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a usage error: exit 2, as argparse does
        parser.print_help(sys.stderr)
        print("\nstimg: error: a command is required, e.g. `stimg demo`.", file=sys.stderr)
        return 2
    if args.command == "demo":
        from ._demo import demo

        return demo(args)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
