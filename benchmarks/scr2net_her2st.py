"""SCR²Net on HER2ST in the form of the SCR²-ST paper's Table 2, on the shared protocol (C LOSO and C→A1).

Same features (EfficientNet-Lite0, 112 µm → 224 px, full-resolution C2–C6), same folds and genes (top-50
HVGs on the fold's training sections) as every other HER2ST benchmark (``_protocol.py``).

Part 1 (Table 2): ridge (``si.models.RidgeRegressor``), NB ensemble (``si.models.NBEnsemble``, 5 members),
and SCR²Net variants: regression only (``retrieval=False``), no cell-type filter (``n_types=None``),
full (K = 50, T = 10, the paper's defaults) and K/T = 10/3, 20/5, 100/20. Retrieval variants are scored on
the regression path (the paper's prediction) and on ``'blend'``; the full model also on ``'retrieval'``.
Bank spots are typed by the arg-max of ``obsm['deconv_minor']`` (stereoscope, 22 types), or, in the
"nearest-cell types" rows, by the minor type of their most similar cell of the Wu et al. reference
(``si.models.SingleCellPrior``, PCA encoder, 25 types). The fraction of the K retrieved spots that the
filter keeps (test queries) is reported, since with types dominated by one class T = 10 may filter nothing.

Part 2 (budgets): the training sections are sampled with ``si.tl.active_sample`` (``mode='simulate'``,
SCRL with the scVI single-cell prior of the Wu et al. reference, and random) at 10 % and 25 %;
regression only, full SCR²Net and ridge are trained on the sampled spots through the ``.obs`` mask.

SCR²Net seeds are averaged within a fold; ``mean ± sd`` is over folds (5 C LOSO folds; C→A1 is one fold).
Training (CPU, one thread): defaults of ``SCR2Net.train`` (AdamW 1e-3, batch 256, cosine schedule,
≤ 100 epochs with validation-based model selection and patience 20; the paper's 100-epoch SGD run at
lr 1e-4 is for end-to-end DenseNet training on far more spots).

Run::

    STIMG_BENCH_CACHE=/work/cache/bench_embed OMP_NUM_THREADS=1 python benchmarks/scr2net_her2st.py

Writes ``benchmarks/results/scr2net_her2st.{csv,json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import stimg as si

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _protocol as P  # noqa: E402

HERE = Path(__file__).resolve().parent
CELL_TYPES = "deconv_minor"
VARIANTS = {  # name: (SCR2Net kwargs, prediction modes); cell types from CELL_TYPES unless "cell_types" is given
    "regression only": ({"retrieval": False}, ["regression"]),
    "no cell-type filter": ({"n_types": None}, ["regression", "blend"]),
    "full SCR²Net (K=50, T=10)": ({"top_k": 50, "n_types": 10}, ["regression", "blend", "retrieval"]),
    "K=10, T=3": ({"top_k": 10, "n_types": 3}, ["regression", "blend"]),
    "K=20, T=5": ({"top_k": 20, "n_types": 5}, ["regression", "blend"]),
    "K=100, T=20": ({"top_k": 100, "n_types": 20}, ["regression", "blend"]),
    "full, nearest-cell types": ({"top_k": 50, "n_types": 10, "cell_types": "prior"}, ["regression", "blend"]),
    "K=10, T=3, nearest-cell types": ({"top_k": 10, "n_types": 3, "cell_types": "prior"}, ["regression", "blend"]),
    # not in the paper: heads trained alone first, so the soft labels are informative when regression starts
    "full + 10 heads-only warm-up epochs": ({"top_k": 50, "n_types": 10, "train": {"warmup_epochs": 10}},
                                            ["regression", "blend", "retrieval"]),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if "warm-up" not in v]
PRIORS: dict = {}  # "prior": SingleCellPrior of the Wu et al. reference (celltype_minor, PCA encoder)


def kept_fraction(model, table) -> float:
    """Mean fraction of the K retrieved bank spots that the majority filter keeps, over ``table``'s spots."""
    from stimg.models._contrastive import l2_normalize
    from stimg.models._scr2net import _retrieval as R

    m, cfg = model.module.eval(), model.retrieval_config
    with torch.no_grad():
        f = m.features(torch.from_numpy(np.asarray(table.obsm[P.EMBED_KEY], dtype=np.float32)))
        _, idx = R.top_k(l2_normalize(m.image_embedding(f)), m.bank_keys, cfg.k)
        keep = R.majority_type_mask(m.bank_types[idx], cfg.n_types)
    return float(keep.float().mean())


def scr2(adata, d, kw, seed, train_indices=None, train_data=None):
    data = adata if train_data is None else train_data
    kw = dict(kw)
    types, train_kw = kw.pop("cell_types", CELL_TYPES), kw.pop("train", {})
    model = si.models.SCR2Net(data, P.EMBED_KEY, genes=d.genes, cell_types=PRIORS.get(types, types), seed=seed, **kw)
    model.train(train_indices=d.train if train_indices is None else train_indices, accelerator="cpu", seed=seed,
                progress=False, **train_kw)
    return model


def part1(adata, folds, seeds, rows, variants, baselines=True):
    t = time.perf_counter()
    PRIORS["prior"] = si.models.SingleCellPrior(si.datasets.her2st_sc_reference(), "celltype_minor",
                                                encoder="pca").fit(adata.var_names)
    print(f"nearest-cell typing prior (PCA, celltype_minor) fitted in {time.perf_counter() - t:.0f} s", flush=True)
    for fold in folds:
        d = P.fold_data(adata, fold, n_genes=50)
        te = adata[d.test]
        if baselines:
            t = time.perf_counter()
            train_mask = np.isin(np.arange(adata.n_obs), d.train)
            ridge = si.models.RidgeRegressor().fit(adata, P.EMBED_KEY, genes=d.genes, train_indices=train_mask,
                                                   library_key="library_id")
            rows.append({"part": "table2", "fold": fold.name, "kind": fold.kind, "method": "ridge", "mode": "-",
                         "seed": 0, **P.score(d, ridge.predict(te).mean), "seconds": time.perf_counter() - t})
            t = time.perf_counter()
            ad_tr = adata[d.train].copy()
            si.models.NBRegressor.setup_anndata(ad_tr, embedding_key=P.EMBED_KEY, genes=d.genes)
            ens = si.models.NBEnsemble(ad_tr, n_members=5)
            ens.train(accelerator="cpu", progress=False)
            rows.append({"part": "table2", "fold": fold.name, "kind": fold.kind, "method": "NB ensemble", "mode": "-",
                         "seed": 0, **P.score(d, ens.predict(te).mean), "seconds": time.perf_counter() - t})
        for name in variants:
            kw, modes = VARIANTS[name]
            for seed in seeds:
                t = time.perf_counter()
                model = scr2(adata, d, kw, seed)
                secs = time.perf_counter() - t
                kept = kept_fraction(model, te) if kw.get("retrieval", True) else np.nan
                for mode in modes:
                    rows.append({"part": "table2", "fold": fold.name, "kind": fold.kind, "method": name, "mode": mode,
                                 "seed": seed, **P.score(d, model.predict(te, mode=mode).mean), "seconds": secs,
                                 "epochs": len(model.history_), "kept_fraction": kept,
                                 "best_epochs": json.dumps(model.best_epochs_)})
        print(pd.DataFrame([r for r in rows if r["fold"] == fold.name]).groupby(["method", "mode"], sort=False)
              [["pcc", "mse", "mae"]].mean().round(4).to_string(), flush=True)


def part2(adata, folds, seeds, budgets, rows):
    ref = si.datasets.her2st_sc_reference()
    t = time.perf_counter()
    prior = si.models.SingleCellPrior(ref, "celltype_major", encoder="scvi").fit(adata.var_names)
    print(f"single-cell prior fitted in {time.perf_counter() - t:.0f} s", flush=True)
    for fold in folds:
        d = P.fold_data(adata, fold, n_genes=50)
        te = adata[d.test]
        pool = adata[d.train].copy()
        for method in ("scrl", "random"):
            for budget in budgets:
                for seed in seeds:
                    t = time.perf_counter()
                    kw = {"prior": prior} if method == "scrl" else {}
                    si.tl.active_sample(pool, budget, method=method, mode="simulate", embedding_key=P.EMBED_KEY,
                                        library_key="library_id", seed=seed, progress=False, **kw)
                    t_sample = time.perf_counter() - t
                    base = {"part": "budget", "fold": fold.name, "kind": fold.kind, "sampler": method,
                            "budget": budget, "seed": seed, "n_train": int(pool.obs["si_sampled"].sum()),
                            "sample_seconds": t_sample}
                    ridge = si.models.RidgeRegressor().fit(pool, P.EMBED_KEY, genes=d.genes, train_indices="si_sampled",
                                                           library_key="library_id")
                    rows.append({**base, "method": "ridge", "mode": "-", **P.score(d, ridge.predict(te).mean)})
                    for name in ("regression only", "full SCR²Net (K=50, T=10)"):
                        kw_m, modes = VARIANTS[name]
                        model = scr2(adata, d, kw_m, seed, train_indices="si_sampled", train_data=pool)
                        for mode in modes:
                            rows.append({**base, "method": name, "mode": mode,
                                         **P.score(d, model.predict(te, mode=mode).mean),
                                         "epochs": len(model.history_)})
        sub = pd.DataFrame([r for r in rows if r["fold"] == fold.name and r["part"] == "budget"])
        print(sub.groupby(["sampler", "budget", "method", "mode"], sort=False)[["pcc", "mse"]].mean().round(4)
              .to_string(), flush=True)


def summarize(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Seeds averaged within a fold, then ``mean ± sd`` over folds, separately for C LOSO and C→A1."""
    per_fold = df.groupby(["kind", *by, "fold"], sort=False)[["pcc", "mse", "mae"]].mean().reset_index()
    out = []
    for kind, label in (("within-patient", "C LOSO (5 folds)"), ("cross-patient", "C→A1")):
        s = P.summarize(per_fold[per_fold.kind == kind], by)
        s.columns = [f"{label} {c.upper()}" for c in s.columns]
        out.append(s)
    return pd.concat(out, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25])
    ap.add_argument("--folds", nargs="+", default=None, help="test sections (default: C2–C6 and A1)")
    ap.add_argument("--skip-budgets", action="store_true")
    ap.add_argument("--only-budgets", action="store_true",
                    help="re-run part 2 only; part 1 rows (and timing) are kept from the existing results at --out")
    ap.add_argument("--summarize-only", action="store_true",
                    help="run nothing: rewrite the .md/.json summaries from the rows in the .csv at --out")
    ap.add_argument("--note", default=None, help="a line for the .md (e.g. how the rows of a combined .csv were run)")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="SCR²Net variants of part 1 (default: all but the warm-up experiment)")
    ap.add_argument("--no-baselines", action="store_true", help="skip ridge and the NB ensemble in part 1")
    ap.add_argument("--out", default=str(HERE / "results" / "scr2net_her2st"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    si.settings.progress = False
    si.settings.verbosity = 1
    t0 = time.perf_counter()
    out = Path(a.out)
    if a.summarize_only:
        write_summaries(a, pd.read_csv(out.with_suffix(".csv")), out,
                        json.loads(out.with_suffix(".json").read_text())["meta"]["seconds"])
        return
    adata = P.load()
    t_load = time.perf_counter() - t0
    folds = [f for f in P.FOLDS if a.folds is None or f.test in a.folds]
    rows: list[dict] = []
    t1 = time.perf_counter()
    if a.only_budgets:
        old = pd.read_csv(out.with_suffix(".csv"))
        rows = old[old.part == "table2"].to_dict("records")
        t_part1 = json.loads(out.with_suffix(".json").read_text())["meta"]["seconds"]["table2"]
    else:
        part1(adata, folds, a.seeds, rows, a.variants or DEFAULT_VARIANTS, baselines=not a.no_baselines)
        t_part1 = time.perf_counter() - t1
    t2 = time.perf_counter()
    if not a.skip_budgets:
        part2(adata, folds, a.budget_seeds, a.budgets, rows)
    t_part2 = time.perf_counter() - t2
    df = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    write_summaries(a, df, out, {"load": t_load, "table2": t_part1, "budgets": t_part2,
                                 "total": time.perf_counter() - t0})


def write_summaries(a, df: pd.DataFrame, out: Path, seconds: dict) -> None:
    """Table 2 and (when present) the budget table as .md and .json beside the rows' .csv."""
    t2tab = summarize(df[df.part == "table2"], ["method", "mode"])
    kept = df[df.part == "table2"].groupby(["method", "mode"], sort=False)["kept_fraction"].mean().round(3)
    t2tab["kept by filter"] = kept.reindex(t2tab.index).to_numpy()
    cmd = " ".join(["python", *("'…'" if x == a.note else x for x in sys.argv)])
    md = ["# SCR²Net on HER2ST (Table-2 form)", "", f"Command: `{cmd}`", "",
          t2tab.to_markdown(), ""]
    if a.only_budgets:
        md[2:2] = ["Table 2 rows: kept from the previous full run (`python benchmarks/scr2net_her2st.py`); the budget "
                   "part was re-run with the command above.", ""]
    if a.note:
        md[2:2] = [a.note, ""]
    summary = {"table2": json.loads(t2tab.to_json(orient="index"))}
    if (df.part == "budget").any():
        b = df[df.part == "budget"]
        btab = summarize(b, ["sampler", "budget", "method", "mode"])
        md += ["## Training sets chosen by SCRL and random", "", btab.to_markdown(), ""]
        summary["budgets"] = json.loads(btab.to_json(orient="index"))
    meta = {"command": cmd, "note": a.note, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "seeds": a.seeds, "budget_seeds": a.budget_seeds,
            "cell_types": CELL_TYPES, "n_genes": 50, "encoder": "efficientnet_lite0",
            "seconds": seconds}
    out.with_suffix(".md").write_text("\n".join(md) + f"\nTimings (s): {json.dumps(meta['seconds'])}\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **summary}, indent=1, ensure_ascii=False))
    print("\n".join(md))
    print(json.dumps(meta["seconds"]))


if __name__ == "__main__":
    main()
