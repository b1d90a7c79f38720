"""``stimg demo``: the mission end to end on HER2ST, with one progress display and a one-page report."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

LEVELS = (0.8, 0.9, 0.95)
SAMPLING_METHODS = ("random", "kmeans", "scrl")


class _Steps:
    """One progress bar over the whole run; each step advances it by its expected share of the time."""

    def __init__(self, weights: dict[str, float], show: bool) -> None:
        self.weights, self.times = weights, {}
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=float(sum(weights.values())), desc="stimg demo", file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}", leave=True)

    @contextmanager
    def __call__(self, name: str):
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0
        if self.bar is not None:
            self.bar.update(self.weights.get(name, 0.0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("done")
            self.bar.close()


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _metric(res, group: str, metric: str) -> float:
    return float(res.query("group == @group and metric == @metric")["value"].iloc[0])


def _check_args(args: argparse.Namespace) -> tuple[list[str], str] | str:
    sections = list(dict.fromkeys(args.sections))
    test = args.test_section or sections[-1]
    if test not in sections:
        sections.append(test)
    train = [s for s in sections if s != test]
    if not train:
        return "need at least one training section besides the test section."
    if args.n_genes < 1:
        return "--n-genes must be ≥ 1."
    if args.context_um < 0:
        return "--context-um must be ≥ 0 (0 disables spatial context)."
    if args.members < 2:
        return "--members must be ≥ 2 (an ensemble needs two members for epistemic uncertainty)."
    if len(train) < 2:
        return "conformal calibration leaves one training section out at a time: pass ≥ 2 training sections."
    if any(not 0 < b <= 1 for b in args.budgets):
        return "--budgets must be fractions in (0, 1]."
    return train, test


def demo(args: argparse.Namespace) -> int:
    """Run ``stimg demo``; returns the exit status."""
    checked = _check_args(args)
    if isinstance(checked, str):
        print(f"stimg demo: {checked}", file=sys.stderr)
        return 2
    train, test = checked
    t0, c0 = time.perf_counter(), _cpu_seconds()

    import stimg as si
    from stimg._utils import torch_threads

    if args.datadir:
        si.settings.datadir = args.datadir
    if args.quiet:
        si.settings.verbosity = 1
    si.settings.progress = False  # the demo's own bar is the only progress display
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "feature_cache"
    weights = {"read": 10, "tissue QC": 1, "embed": 50, "context": 1, "genes": 2, "ridge": 2, "NB ensemble": 5,  # ≈ CPU shares
               "conformal calibration": 12, "predict": 4, "active sampling": 0 if args.no_sampling else 8,
               "figures": 6, "report": 1}
    steps = _Steps(weights, show=not args.no_progress)
    res: dict[str, Any] = {"train": train, "test": test}
    limits = ExitStack()
    try:
        with steps("read"):
            sdata = si.datasets.her2st([*train, test])
            res["n_read"] = sdata.tables["table"].n_obs
        with steps("tissue QC"):
            if args.min_tissue > 0:
                si.pp.tissue_coverage(sdata, size_um=args.patch_um, min_coverage=args.min_tissue)
            table = sdata.tables["table"]
        with steps("embed"):
            si.pp.embed(sdata, args.encoder, patch_um=args.patch_um, patch_px=args.patch_px,
                        batch_size=args.batch_size, cache_dir=cache_dir, progress=False)
            key = f"X_{args.encoder}"
        if args.context_um > 0:
            with steps("context"):
                si.pp.spatial_context(sdata, key, radius_um=args.context_um, method="concat", n_jobs=1)
                key = f"{key}_context"
        # what follows works on small matrices: one thread is faster and, on shared cores, far cheaper
        limits.enter_context(torch_threads(0))
        with steps("genes"):
            lib = table.obs["library_id"].astype(str)
            train_mask, test_mask = lib.isin(train).to_numpy(), (lib == test).to_numpy()
            si.pp.select_genes(table, args.n_genes, method="hvg", subset=train)
            genes = list(table.var_names[table.var["si_target"].to_numpy(bool)])
        with steps("ridge"):
            ridge = si.models.RidgeRegressor().fit(table, key, train_indices=train_mask)
            si.tl.predict_expression(table, ridge, key_added="si_pred_ridge")
            res["ridge"] = si.tl.evaluate(table, pred_layer="si_pred_ridge", genes=genes, mask=test_mask,
                                          key_added="si_eval_ridge")
            res["ridge_desc"] = f"PCA {ridge.n_components_}, alpha {ridge.alpha_:g} ({ridge.cv_scheme_})"
        with steps("NB ensemble"):
            si.models.NBRegressor.setup_anndata(table, embedding_key=key)
            ens = si.models.NBEnsemble(table, n_members=args.members)
            ens.train(train_indices=train_mask, progress=False)
            res["epochs"] = [len(m.history["elbo_train"]) for m in ens.members]
        with steps("conformal calibration"):
            ens.calibrate("library_id", progress=False)
        with steps("predict"):
            si.tl.predict_expression(table, ens)
            res["nb"] = si.tl.evaluate(table, genes=genes, mask=test_mask)
            res["coverage"], res["per_gene_coverage"], res["spearman"] = _coverage(si, table, ens, test_mask, genes)
        if not args.no_sampling:
            with steps("active sampling"):
                verbosity, si.settings.verbosity = si.settings.verbosity, min(si.settings.verbosity, 1)
                try:  # 18 samplings × (sample, fit, predict): their log lines would bury the run; the table follows
                    res["sampling"], res["sampled"] = _sampling(si, sdata, table, train_mask, test, genes, key, args)
                finally:
                    si.settings.verbosity = verbosity
        with steps("figures"):
            res["figures"] = _figures(si, sdata, table, res, genes, test_mask, out, args)
        with steps("report"):
            res["wall"], res["cpu"] = time.perf_counter() - t0, _cpu_seconds() - c0
            res["times"] = steps.times
            files = _write_tables(res, out, genes)
            from ._report import write_report

            report = write_report(res, out, args, files)
    finally:
        limits.close()
        steps.close()
    res["wall"], res["cpu"] = time.perf_counter() - t0, _cpu_seconds() - c0
    print(_summary(res, args, table, key, report))
    return 0


def _coverage(si, table, ens, test_mask, genes):
    """Nominal vs measured coverage of the test counts, uncalibrated and calibrated; per-gene coverage at 90 %."""
    import numpy as np
    import pandas as pd

    test = table[test_mask]
    cols = table.var_names.get_indexer(genes)
    counts = test.X[:, cols]
    counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float64)
    y = np.log1p(counts)
    pred = np.asarray(test.layers["si_pred"][:, cols], dtype=np.float64)
    epi = np.asarray(test.layers["si_epistemic"][:, cols], dtype=np.float64)
    rows, per_gene = [], {}
    for level in LEVELS:
        for cal in (False, True):
            lo, hi = ens.predict_interval(test, level=level, calibrated=cal)
            r = si.metrics.uncertainty_calibration(y, pred, epi, lower=lo, upper=hi, observed=counts, var_names=genes)
            name = "calibrated" if cal else "uncalibrated"
            rows.append({"nominal": level, "intervals": name, "coverage": r.coverage,
                         "mean_width_counts": float(np.mean(hi - lo))})
            if level == 0.9:
                per_gene[f"coverage_90_{name}"] = r.per_gene["all"]
                spearman = r.spearman
    return pd.DataFrame(rows), pd.DataFrame(per_gene), spearman


def _sampling(si, sdata, table, train_mask, test, genes, key, args):
    """SCRL vs random vs k-means on the training pool, scored on the test section; one SCRL plan to draw."""
    import pandas as pd

    scrl: dict[str, Any] = {"n_rounds": 10}
    try:  # the single-cell prior of SCRL (Wu et al. 2021), fitted once; PCA gene encoder to stay fast
        ref = si.datasets.her2st_sc_reference()
        scrl["prior"] = si.models.SingleCellPrior(ref, "celltype_major", encoder="pca").fit(table.var_names)
    except FileNotFoundError:
        pass  # SCRL falls back to clusters of the sampled spots' own expression
    res = si.tl.simulate_sampling(table, SAMPLING_METHODS, args.budgets, test=test, seeds=range(args.seeds),
                                  genes=genes, embedding_key=key, progress=False, method_kwargs={"scrl": scrl})
    pool = table[train_mask].copy()
    plan = si.tl.active_sample(pool, min(args.budgets), method="scrl", embedding_key=key, progress=False,
                               inplace=False, **scrl)
    sampled = pd.Series(False, index=table.obs_names)
    sampled[plan.index] = plan.iloc[:, 0].to_numpy()
    return res, sampled


def _figures(si, sdata, table, res, genes, test_mask, out: Path, args) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    test = res["test"]
    figs: dict[str, Path] = {}
    per_gene = res["nb"].attrs["per_gene"][test].dropna().sort_values(ascending=False)
    show = list(per_gene.index[: max(1, args.n_show)])
    X = table.X
    table.layers["log1p"] = np.log1p(X.toarray() if hasattr(X, "toarray") else np.asarray(X))
    try:
        panels = [("log1p", "measured"), ("si_pred_ridge", "ridge"), ("si_pred", "NB ensemble"),
                  ("si_aleatoric", "aleatoric var"), ("si_epistemic", "epistemic var")]
        fig, axs = plt.subplots(len(show), len(panels), figsize=(3.9 * len(panels), 3.7 * len(show)), squeeze=False)
        for i, g in enumerate(show):
            j = table.var_names.get_loc(g)
            vals = np.concatenate([np.asarray(table.layers[la][test_mask, j], float) for la in
                                   ("log1p", "si_pred_ridge", "si_pred")])
            vmin, vmax = float(np.nanmin(vals)), float(np.nanmax(vals))
            for k, (layer, name) in enumerate(panels):
                expr = k < 3
                title = f"{g}: {name}"
                if layer == "si_pred":
                    title += f" (PCC {per_gene[g]:.2f})"
                elif layer == "si_pred_ridge":
                    title += f" (PCC {res['ridge'].attrs['per_gene'].loc[g, test]:.2f})"
                si.pl.spatial(sdata, g, layer=layer, library_id=test, ax=axs[i, k], title=title,
                              cmap="viridis" if expr else "magma", vmin=vmin if expr else None,
                              vmax=vmax if expr else None)
        fig.suptitle(f"HER2ST {test} (held out): measured vs predicted expression and uncertainty over the H&E")
        fig.tight_layout()
        figs["spatial"] = out / f"demo_{test}_spatial.png"
        fig.savefig(figs["spatial"], dpi=80)
        plt.close(fig)
    finally:
        del table.layers["log1p"]

    cov = res["coverage"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    nominal = np.array(LEVELS) * 100
    ax.plot([75, 100], [75, 100], color="grey", lw=1, ls="--", label="nominal = measured")
    for name, marker in (("uncalibrated", "o"), ("calibrated", "s")):
        c = cov[cov["intervals"] == name]["coverage"].to_numpy() * 100
        ax.plot(nominal, c, marker=marker, label=f"{name} NB intervals")
    ax.set_xlabel("nominal coverage (%)")
    ax.set_ylabel(f"measured coverage of {test} counts (%)")
    ax.set_title("Predictive intervals of counts on the held-out section")
    ax.set_xlim(75, 100)
    ax.set_ylim(75, 100)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    figs["coverage"] = out / f"demo_{test}_coverage.png"
    fig.savefig(figs["coverage"], dpi=80)
    plt.close(fig)

    if "sampling" in res:
        fig, ax = plt.subplots(figsize=(5, 4))
        si.pl.sampling_curve(res["sampling"], metric="pcc", ax=ax)
        ax.set_xlabel("budget (fraction of training spots sequenced)")
        ax.set_ylabel(f"PCC on {test} (ridge, mean ± sd over seeds)")
        ax.set_title("Which spots to sequence: SCRL vs baselines")
        fig.tight_layout()
        figs["budget"] = out / "demo_budget_curve.png"
        fig.savefig(figs["budget"], dpi=80)
        plt.close(fig)
        table.obs["si_demo_scrl"] = res["sampled"].reindex(table.obs_names).fillna(False).to_numpy(bool)
        try:
            train = res["train"]
            fig, axs = plt.subplots(1, len(train), figsize=(3.6 * len(train), 3.8), squeeze=False)
            si.pl.spatial(sdata, "si_demo_scrl", library_id=train, ax=list(axs[0]),
                          palette={True: "crimson", False: "lightgrey"}, legend=False)
            for a, s in zip(axs[0], train, strict=True):
                n = int(table.obs.loc[table.obs["library_id"].astype(str) == s, "si_demo_scrl"].sum())
                a.set_title(f"{s}: {n} spots chosen")
            fig.suptitle(f"SCRL plan: {min(args.budgets):.0%} of the training spots (red) to sequence")
            fig.tight_layout()
            figs["sampled"] = out / "demo_sampled_spots.png"
            fig.savefig(figs["sampled"], dpi=80)
            plt.close(fig)
        finally:
            del table.obs["si_demo_scrl"]
    return figs


def _write_tables(res, out: Path, genes) -> dict[str, Path]:
    import pandas as pd

    test = res["test"]
    rows = []
    for model, ev in (("ridge", res["ridge"]), ("NB ensemble", res["nb"])):
        for metric in ("pcc", "pcc_pooled", "mse", "mae"):
            group = "all" if metric == "pcc_pooled" else test
            rows.append({"model": model, "metric": metric, "value": _metric(ev, group, metric)})
    cov90 = res["coverage"].set_index(["nominal", "intervals"])["coverage"]
    rows += [{"model": "NB ensemble", "metric": "coverage_90_uncalibrated", "value": float(cov90[(0.9, "uncalibrated")])},
             {"model": "NB ensemble", "metric": "coverage_90_calibrated", "value": float(cov90[(0.9, "calibrated")])},
             {"model": "NB ensemble", "metric": "spearman_epistemic_abs_error", "value": float(res["spearman"])}]
    files = {"metrics": out / "metrics.csv", "coverage": out / "coverage.csv", "per_gene": out / "per_gene.csv"}
    pd.DataFrame(rows).to_csv(files["metrics"], index=False)
    res["metrics"] = pd.DataFrame(rows)
    res["coverage"].to_csv(files["coverage"], index=False)
    per_gene = pd.DataFrame({"pcc_ridge": res["ridge"].attrs["per_gene"][test],
                             "pcc_nb_ensemble": res["nb"].attrs["per_gene"][test]}).join(res["per_gene_coverage"])
    per_gene.loc[genes].sort_values("pcc_nb_ensemble", ascending=False).to_csv(files["per_gene"])
    if "sampling" in res:
        files["sampling"] = out / "sampling.csv"
        res["sampling"].to_csv(files["sampling"], index=False)
    return files


def _sampling_table(res) -> list[str]:
    s = res["sampling"]
    s = s[s["metric"] == "pcc"].groupby(["method", "budget"])["value"].agg(["mean", "std"])
    budgets = sorted(s.index.get_level_values("budget").unique())
    lines = [f"  {'PCC on test (mean ± sd)':<28}" + "".join(f"{f'{b:.0%} budget':>18}" for b in budgets)]
    for m in SAMPLING_METHODS:
        if m in s.index.get_level_values("method"):
            lines.append(f"  {m:<28}" + "".join(f"{s.loc[(m, b), 'mean']:>11.3f} ± {s.loc[(m, b), 'std']:.3f}"
                                                for b in budgets))
    return lines


def _n_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _summary(res, args, table, key, report: Path) -> str:
    test, train = res["test"], res["train"]
    m = res["metrics"].pivot_table(index="metric", columns="model", values="value", sort=False)
    p = table.uns[f"X_{args.encoder}"]["params"]
    context = (f"; spatial context: own features + neighbours' mean within {args.context_um:g} µm "
               f"({table.obsm[key].shape[1]}-d, si.pp.spatial_context)" if args.context_um > 0 else "; no spatial context")
    lines = [
        "",
        f"stimg demo — HER2ST, train {', '.join(train)} → test {test}",
        f"  spots: {res['n_read']} read, {table.n_obs} after tissue QC (≥ {args.min_tissue:.0%}); "
        f"test spots {int((table.obs['library_id'].astype(str) == test).sum())}",
        f"  encoder: {args.encoder}, {args.patch_um:g} µm patches of {p['patch_px']} px, "
        f"{table.obsm[f'X_{args.encoder}'].shape[1]}-d "
        f"({p['n_from_cache']} spots from cache){context}",
        f"  ridge: {res['ridge_desc']}; NB ensemble: {args.members} members "
        f"(epochs {res['epochs']}); {args.n_genes} HVGs chosen on the training sections",
        "",
        f"  {'metric (' + test + ', log1p counts)':<28}{'ridge':>12}{'NB ensemble':>14}",
    ]
    names = {"pcc": "mean PCC over genes", "pcc_pooled": "pooled PCC", "mse": "MSE", "mae": "MAE"}
    for k, name in names.items():
        lines.append(f"  {name:<28}{m.loc[k, 'ridge']:>12.3f}{m.loc[k, 'NB ensemble']:>14.3f}")
    lines += ["", f"  {'NB count intervals':<28}{'nominal':>10}{'uncalibrated':>14}{'calibrated':>12}"]
    cov = res["coverage"].pivot_table(index="nominal", columns="intervals", values="coverage")
    for lv in LEVELS:
        lines.append(f"  {'coverage of ' + test + ' counts':<28}{lv:>10.0%}{cov.loc[lv, 'uncalibrated']:>14.1%}"
                     f"{cov.loc[lv, 'calibrated']:>12.1%}")
    lines.append(f"  {'Spearman(epistemic, |error|)':<28}{res['spearman']:>10.3f}")
    if "sampling" in res:
        lines += ["", *_sampling_table(res)]
    lines += ["", f"  report: {report}", f"  figures: {', '.join(str(f) for f in res['figures'].values())}",
              f"  wall time {res['wall']:.1f}s (CPU time {res['cpu']:.1f}s on {_n_cpus()} cores)"]
    return "\n".join(lines)
