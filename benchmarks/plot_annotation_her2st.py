"""Learning curves of the HER2ST annotation benchmark: image only (30 seeds) and multimodal (20 seeds).

Reads the stored results (``benchmarks/results/annotation_her2st.csv`` seeds 0–9,
``annotation_her2st_training_variants.csv`` rows ``training == 'warm'`` seeds 10–29,
``annotation_her2st_multimodal.csv``) and draws least-confidence vs random, weighted F1 per round,
mean ± sd over seeds, one panel per section:

    python benchmarks/plot_annotation_her2st.py  # → benchmarks/results/annotation_her2st_curves.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import stimg as si  # noqa: E402

RES = Path(__file__).parent / "results"
SECTIONS = ["A1", "C2", "C3", "C4", "C5", "C6"]
RULES = ["least_confidence", "random"]


def main() -> None:
    first = pd.read_csv(RES / "annotation_her2st.csv")
    more = pd.read_csv(RES / "annotation_her2st_training_variants.csv")
    more = more[(more["training"] == "warm") & (more["features"] == "patch")].assign(metric="weighted_f1")
    image = pd.concat([first[first["metric"] == "weighted_f1"], more], ignore_index=True)
    multi = pd.read_csv(RES / "annotation_her2st_multimodal.csv")
    rows = [("image only, 30 seeds", image), ("image + 1,000 HVGs, 20 seeds", multi)]
    fig, axes = plt.subplots(len(rows), len(SECTIONS), figsize=(3.0 * len(SECTIONS), 2.8 * len(rows)),
                             sharex=True, constrained_layout=True)
    for i, (title, df) in enumerate(rows):
        for j, sec in enumerate(SECTIONS):
            ax = axes[i, j]
            si.pl.annotation_curve(df[(df["section"] == sec) & (df["round"] <= 6)], rules=RULES, ax=ax, capsize=2)
            ax.set_title(f"{sec} — {title}" if j == 0 else sec, fontsize=9, loc="left")
            ax.set_ylabel("weighted F1" if j == 0 else "")
            if i < len(rows) - 1:
                ax.set_xlabel("")
            if (i, j) != (0, 0) and ax.get_legend() is not None:
                ax.get_legend().remove()
    out = RES / "annotation_her2st_curves.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
