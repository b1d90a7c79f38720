"""The one-page Markdown report of ``stimg demo`` (tables inline, figures linked)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(res: dict[str, Any], out: Path, args: argparse.Namespace, files: dict[str, Path]) -> Path:
    """Write ``out/report.md`` and return its path."""
    import os

    import stimg as si

    test, train = res["test"], res["train"]
    m = res["metrics"].pivot_table(index="metric", columns="model", values="value", sort=False)
    rel = {k: Path(v).name for k, v in {**files, **res["figures"]}.items()}
    lines = [
        f"# stimg demo: HER2ST, train {', '.join(train)} → test {test}",
        "",
        f"stimg {si.__version__}, {args.encoder} features of {args.patch_um:g} µm patches"
        + (f" plus their neighbours' mean within {args.context_um:g} µm (`si.pp.spatial_context`)"
           if args.context_um > 0 else "") + f", {args.n_genes} highly "
        f"variable genes chosen on the training sections, NB ensemble of {args.members} members. "
        f"Wall time {res['wall']:.0f} s (CPU time {res['cpu']:.0f} s) on {os.cpu_count()} CPU cores "
        f"({platform.machine()}).",
        "",
        "## Prediction on the held-out section",
        "",
        "Scores on log1p counts of the test section (`si.tl.evaluate`): Pearson correlation per gene across "
        "spots averaged over genes, pooled PCC, MSE, MAE.",
        "",
        *_md_table(["metric", "ridge", "NB ensemble"],
                   [[k, f"{m.loc[k, 'ridge']:.3f}", f"{m.loc[k, 'NB ensemble']:.3f}"]
                    for k in ("pcc", "pcc_pooled", "mse", "mae")]),
        "",
        f"![measured vs predicted and uncertainty]({rel['spatial']})",
        "",
        "Rows: the best-predicted genes. Columns: measured log1p counts, ridge and NB-ensemble predictions "
        "(same colour scale), aleatoric (mean of the members' NB variances) and epistemic (variance of the "
        "members' means) uncertainty, spots at true size over the H&E.",
        "",
        "## Calibrated count intervals",
        "",
        "Fraction of the test section's raw counts (spots × genes) inside the NB-mixture predictive interval "
        "(`ens.predict_interval`), before and after conformal calibration over the training sections "
        f"(`ens.calibrate('library_id')`: each of {', '.join(train)} predicted by an ensemble trained on the others).",
        "",
    ]
    cov = res["coverage"]
    rows = []
    for lv in sorted(cov["nominal"].unique()):
        c = cov[cov["nominal"] == lv].set_index("intervals")
        rows.append([f"{lv:.0%}", f"{c.loc['uncalibrated', 'coverage']:.1%}", f"{c.loc['calibrated', 'coverage']:.1%}",
                     f"{c.loc['uncalibrated', 'mean_width_counts']:.1f} → {c.loc['calibrated', 'mean_width_counts']:.1f}"])
    lines += _md_table(["nominal", "uncalibrated", "calibrated", "mean width (counts)"], rows)
    lines += ["", f"Spearman correlation of per-spot epistemic variance with absolute error: {res['spearman']:.3f}.",
              f"Per-gene coverage: [{rel['per_gene']}]({rel['per_gene']}).", "",
              f"![coverage]({rel['coverage']})", ""]
    if "sampling" in res:
        s = res["sampling"]
        s = s[s["metric"] == "pcc"].groupby(["method", "budget"])["value"].agg(["mean", "std"])
        budgets = sorted(s.index.get_level_values("budget").unique())
        lines += [
            "## Where to sequence next: active sampling",
            "",
            f"`si.tl.simulate_sampling`: the training spots are sampled under each budget by each method, a ridge "
            f"model is trained on the sampled spots only and scored on {test} (PCC, mean ± sd over "
            f"{args.seeds} seeds). SCRL uses the single-cell reference (Wu et al. 2021) when it is in the data "
            "folder.",
            "",
            *_md_table(["method", *[f"{b:.0%}" for b in budgets]],
                       [[meth, *[f"{s.loc[(meth, b), 'mean']:.3f} ± {s.loc[(meth, b), 'std']:.3f}" for b in budgets]]
                        for meth in s.index.get_level_values("method").unique()]),
            "",
            f"![budget curve]({rel['budget']})",
            "",
            f"![SCRL plan]({rel['sampled']})",
            "",
        ]
    lines += ["## Files and timing", ""]
    lines += [f"- [{name}]({name})" for name in sorted({rel[k] for k in files})]
    lines += ["", "Seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in res["times"].items()) + ".", "",
              "Reproduce: `stimg demo " + " ".join(_argv(args)) + "`", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _argv(args: argparse.Namespace) -> list[str]:
    out = ["--sections", *args.sections]
    if args.test_section:
        out += ["--test-section", args.test_section]
    out += ["--n-genes", str(args.n_genes), "--members", str(args.members), "--context-um", f"{args.context_um:g}",
            "--out", str(args.out)]
    return out
