"""Active sampling on real HER2ST, under the one shared protocol (benchmarks/_protocol.py).

Folds: ``C LOSO`` (pool = four of C2–C6, test = the fifth) and ``C→A1`` (pool = C2–C6, test = A1,
another patient). For every fold × sampler × budget × seed, ``si.tl.active_sample`` chooses spots of
the pool (``mode='simulate'``: expression is read only once a spot is chosen), a downstream model is
trained on the chosen spots only and scored on the held-out section with ``_protocol.score``
(``si.metrics``: PCC per gene per slide, MSE, MAE on log1p counts).

Gene sets, chosen on the pool (the fold's training sections) only:
``hvg50`` (headline: top-50 HVGs, ``si.pp.select_genes(method='hvg')``) and ``var300`` (top-300 by
variance of log1p counts).

Downstream models:
``ridge``  ``si.models.RidgeRegressor()`` (standardise → PCA(≤ 256) → ridge, alpha by section-grouped CV);
``nb``     ``si.models.NBEnsemble`` of ``--nb-members`` NB regressors (default 3), at most
           ``--nb-epochs`` epochs (default 100) with early stopping on 10 % of the chosen spots.

The run is incremental: every (fold, sampler, budget, seed, model, genes) row is appended to the CSV
as soon as it is measured, and rows already in the CSV are skipped, so an interrupted run resumes.
The chosen spots are stored too (``--selections``), so adding a model later does not sample again.
Everything runs single-threaded (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``).

Usage::

    python benchmarks/her2st_sampling.py                                  # default samplers, all folds
    python benchmarks/her2st_sampling.py --samplers scrl scrl_no_img --models ridge --genes hvg50
    python benchmarks/her2st_sampling.py --summary                        # print the tables only

Samplers are named variants (``SAMPLERS`` below): the library's methods with their defaults, and
the SCRL ablations. Writes ``benchmarks/results/her2st_sampling.csv`` (tidy, one row per metric
value) and prints mean ± sd tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

#: name -> (method, method_kwargs). ``prior=True`` is replaced by the one fitted scVI single-cell prior.
_PAPER = {"prior": True, "weights": (20.0, 5.0, 10.0, 0.0, 0.0), "start": "random", "state": False,
          "baseline": "running", "n_rollouts": 8}
SAMPLERS: dict[str, tuple[str, dict]] = {
    "random": ("random", {}),
    "grid": ("grid", {}),
    "kmeans": ("kmeans", {}),
    "diversity": ("diversity", {}),
    "uncertainty": ("uncertainty", {}),
    "scrl": ("scrl", {"prior": True}),  # the library's default settings (+ the reference prior)
    # SCR²-ST as published (sign of D_cover fixed, tissue units), then one change at a time
    "scrl_paper": ("scrl", _PAPER),
    "scrl_paper+img": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 20.0, 0.0)}),
    "scrl_paper+unc": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 0.0, 2.0)}),
    "scrl_paper+state": ("scrl", {**_PAPER, "state": True}),
    "scrl_paper+rloo": ("scrl", {**_PAPER, "baseline": "rloo"}),
    "scrl_paper+r32": ("scrl", {**_PAPER, "n_rollouts": 32}),
    "scrl_paper+kmstart": ("scrl", {**_PAPER, "start": "kmeans"}),
    "scrl_img_only": ("scrl", {**_PAPER, "weights": (0.0, 0.0, 0.0, 20.0, 0.0)}),
    "scrl_all": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 20.0, 2.0), "state": True, "baseline": "rloo",
                          "n_rollouts": 32, "start": "kmeans"}),
    # image coverage + state + RLOO + 32 rollouts (no uncertainty term, no k-means start); then image weight 50
    "scrl_cov": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 20.0, 0.0), "state": True, "baseline": "rloo",
                          "n_rollouts": 32}),
    "scrl_cov_img50": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 50.0, 0.0), "state": True,
                                "baseline": "rloo", "n_rollouts": 32}),
    # reward weights tuned on the C folds only: (w_img, w_unc) on top of the paper's (20, 5, 10)
    **{f"scrl_cov_img{wi:g}_unc{wu:g}": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, float(wi), float(wu)),
                                                   "state": True, "baseline": "rloo", "n_rollouts": 32})
       for wi, wu in ((50, 2), (50, 5), (100, 0), (100, 2))},
    # with the uncertainty term the state-aware policy also sees each spot's uncertainty (from here on)
    "scrl_paper+unc5": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 0.0, 5.0)}),
    "scrl_su_unc5": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 0.0, 5.0), "state": True, "baseline": "rloo",
                              "n_rollouts": 32}),
    "scrl_su_img50_unc5": ("scrl", {**_PAPER, "weights": (20.0, 5.0, 10.0, 50.0, 5.0), "state": True,
                                    "baseline": "rloo", "n_rollouts": 32}),
}
BUDGETS = (0.1, 0.25, 0.5)
KEY_COLS = ["fold", "sampler", "budget", "seed", "model", "genes"]


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def load_table(cache: Path):
    """C2–C6 + A1 with EfficientNet-Lite0 features (protocol ``load()``), cached as a light h5ad."""
    import anndata as ad

    if cache.exists():
        return ad.read_h5ad(cache)
    import _protocol as P

    tab = P.load()
    out = ad.AnnData(X=tab.X, obs=tab.obs[["library_id"]].assign(library_id=tab.obs["library_id"].astype(str)),
                     var=tab.var[[]], obsm={"spatial": np.asarray(tab.obsm["spatial"]),
                                            P.EMBED_KEY: np.asarray(tab.obsm[P.EMBED_KEY])})
    cache.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(cache)
    return out


class CachedPrior:
    """The fitted single-cell prior's labels of every spot, looked up by the spot's counts.

    scVI embeds each spot from its own counts (the encoder's posterior mean), so a spot's nearest
    centroid and nearest-cell type are fixed: the prior is fitted once (``--prior-cache``), the labels
    of all spots stored, and later runs look them up — identical SCRL results without refitting scVI.
    """

    def __init__(self, path: Path) -> None:
        z = np.load(path, allow_pickle=False)
        self.n_centroids, self.n_types = int(z["n_centroids"]), int(z["n_types"])
        self._lookup = {h: i for i, h in enumerate(z["hashes"].tolist())}
        self._cl, self._ty = z["clusters"], z["types"]
        self.encoder = type("ScviGeneEncoder", (), {})()

    @staticmethod
    def hashes(x) -> np.ndarray:
        import hashlib

        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.array([hashlib.sha1(r.tobytes()).hexdigest() for r in x])

    def embed(self, adata, layer=None) -> np.ndarray:
        return np.array([self._lookup[h] for h in self.hashes(adata.X)], dtype=np.int64)

    def label(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._cl[rows], self._ty[rows]


def fit_predict(model: str, pool, test, genes: list[str], key: str, seed: int, a) -> np.ndarray:
    """Train ``model`` on ``pool`` (the chosen spots) and predict log1p expression of ``genes`` on ``test``."""
    import stimg as si

    if model == "ridge":
        m = si.models.RidgeRegressor().fit(pool, key, genes=genes, library_key="library_id")
    else:
        pool = pool.copy()
        si.models.NBRegressor.setup_anndata(pool, embedding_key=key, genes=genes)
        m = si.models.NBEnsemble(pool, n_members=a.nb_members, seeds=[seed * 100 + i for i in range(a.nb_members)])
        m.train(max_epochs=a.nb_epochs, accelerator="cpu", progress=False)
    pred = si.tl.predict_expression(test, m, inplace=False)
    cols = [list(pred.var_names).index(g) for g in genes]
    mean = np.asarray(pred.mean)[:, cols]
    return np.log1p(np.maximum(mean, 0)) if pred.scale == "counts" else mean


def main() -> None:  # noqa: C901, PLR0912, PLR0915 - one linear script
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--folds", nargs="+", default=None, help="fold names (default: all six)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--models", nargs="+", default=["ridge", "nb"], choices=["ridge", "nb"])
    p.add_argument("--genes", nargs="+", default=["hvg50", "var300"], choices=["hvg50", "var300"])
    p.add_argument("--nb-genes", nargs="+", default=["hvg50"], help="gene sets the NB ensemble is trained on")
    p.add_argument("--nb-members", type=int, default=3)
    p.add_argument("--nb-epochs", type=int, default=100)
    p.add_argument("--prior-encoder", default="scvi")
    p.add_argument("--prior-cache", type=Path, default=Path("/work/cache/sampling/prior_scvi_labels.npz"),
                   help="labels of every spot from the fitted prior (written on the first run, reused after)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "her2st_sampling.csv")
    p.add_argument("--table-cache", type=Path, default=Path("/work/cache/sampling/her2st_CA1_eff.h5ad"))
    p.add_argument("--selections", type=Path, default=HERE / "results" / "her2st_sampling_selections.csv",
                   help="spots chosen per fold/sampler/budget/seed, reused by later runs (delete rows of a "
                        "sampler whose code changed)")
    p.add_argument("--order", choices=["fold", "sampler", "seed"], default="fold",
                   help="loop folds then samplers (default), samplers then folds, or seeds then folds then "
                        "samplers (an interrupted run then holds every sampler and fold, with fewer seeds)")
    p.add_argument("--summary", action="store_true", help="only print the tables of --out")
    p.add_argument("--markdown", type=Path, default=None,
                   help="with --summary: also write the tables of --out as markdown to this file")
    a = p.parse_args()
    if a.summary:
        df = pd.read_csv(a.out)
        summarize(df)
        if a.markdown is not None:
            a.markdown.write_text(markdown(df))
        return
    _threads()
    import _protocol as P

    import stimg as si

    si.settings.progress = False
    si.settings.verbosity = 1
    unknown = [s for s in a.samplers if s not in SAMPLERS]
    if unknown:
        msg = f"unknown samplers {unknown}; known: {list(SAMPLERS)}"
        raise SystemExit(msg)
    adata = load_table(a.table_cache)
    folds = [f for f in P.FOLDS if a.folds is None or f.name in a.folds]
    done: set[tuple] = set()
    if a.out.exists():
        prev = pd.read_csv(a.out)
        done = set(map(tuple, prev[KEY_COLS].astype(str).drop_duplicates().to_numpy()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    selections: dict[tuple, tuple[np.ndarray, float]] = {}  # chosen spots, reused by later runs (other models)
    if a.selections.exists():
        for r in pd.read_csv(a.selections, dtype={"indices": str}).itertuples():
            idx = np.array([int(i) for i in str(r.indices).split()], dtype=np.int64)
            selections[(str(r.fold), str(r.sampler), str(r.budget), str(r.seed))] = (idx, float(r.select_s))
    prior = None

    def get_prior():
        nonlocal prior
        if prior is None and a.prior_cache is not None and a.prior_cache.exists():
            prior = CachedPrior(a.prior_cache)
        if prior is None:
            t = time.perf_counter()
            ref = si.datasets.her2st_sc_reference()
            prior = si.models.SingleCellPrior(ref, "celltype_major", encoder=a.prior_encoder, seed=0).fit(
                adata.var_names)
            print(f"single-cell prior ({a.prior_encoder}) fitted in {time.perf_counter() - t:.0f}s", flush=True)
            if a.prior_cache is not None:
                cl, ty = prior.label(prior.embed(adata))
                a.prior_cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(a.prior_cache, hashes=CachedPrior.hashes(adata.X), clusters=cl, types=ty,
                         n_centroids=prior.n_centroids, n_types=prior.n_types)
        return prior

    def key(*parts) -> tuple:
        return tuple(str(x) for x in parts)

    cache: dict[str, tuple] = {}

    def fold_arrays(fold):
        if fold.name not in cache:
            gene_sets = {}
            if "hvg50" in a.genes:
                gene_sets["hvg50"] = P.fold_data(adata, fold, n_genes=50, method="hvg")
            if "var300" in a.genes:
                gene_sets["var300"] = P.fold_data(adata, fold, n_genes=300, method="variance")
            d0 = next(iter(gene_sets.values()))
            cache[fold.name] = (gene_sets, adata[d0.train].copy(), adata[d0.test].copy())
        return cache[fold.name]

    if a.order == "seed":
        order = [(f, s, [seed]) for seed in a.seeds for f in folds for s in a.samplers]
    elif a.order == "fold":
        order = [(f, s, a.seeds) for f in folds for s in a.samplers]
    else:
        order = [(f, s, a.seeds) for s in a.samplers for f in folds]
    for fold, name, seeds in order:
        method, kw0 = SAMPLERS[name]
        for seed in seeds:
            for budget in a.budgets:
                jobs = [(m, g) for m in a.models for g in a.genes if m == "ridge" or g in a.nb_genes]
                todo = [(m, g) for m, g in jobs if key(fold.name, name, budget, seed, m, g) not in done]
                if not todo:
                    continue
                gene_sets, pool, test = fold_arrays(fold)
                kw = dict(kw0)
                if kw.get("prior") is True:
                    kw["prior"] = get_prior()
                skey = key(fold.name, name, budget, seed)
                if skey in selections:
                    mask = np.zeros(pool.n_obs, bool)
                    mask[selections[skey][0]] = True
                    t_sel = selections[skey][1]
                else:
                    t0 = time.perf_counter()
                    sel = si.tl.active_sample(pool, budget, method=method, embedding_key=P.EMBED_KEY,
                                              library_key="library_id", seed=seed, inplace=False, progress=False,
                                              **kw)
                    t_sel = time.perf_counter() - t0
                    mask = sel.iloc[:, 0].to_numpy(bool)
                    selections[skey] = (np.flatnonzero(mask), t_sel)
                    pd.DataFrame([{"fold": fold.name, "sampler": name, "budget": budget, "seed": seed,
                                   "select_s": round(t_sel, 2),
                                   "indices": " ".join(map(str, np.flatnonzero(mask)))}]).to_csv(
                        a.selections, mode="a", header=not a.selections.exists(), index=False)
                rows = []
                for m, g in todo:
                    d = gene_sets[g]
                    t1 = time.perf_counter()
                    pred = fit_predict(m, pool[mask], test, d.genes, P.EMBED_KEY, seed, a)
                    sc = P.score(d, pred)
                    t_fit = time.perf_counter() - t1
                    base = {"fold": fold.name, "kind": fold.kind, "sampler": name, "budget": budget,
                            "seed": seed, "model": m, "genes": g, "n_sampled": int(mask.sum()),
                            "select_s": round(t_sel, 2), "fit_s": round(t_fit, 2)}
                    rows += [{**base, "metric": k, "value": v} for k, v in sc.items()]
                    done.add(key(fold.name, name, budget, seed, m, g))
                pd.DataFrame(rows).to_csv(a.out, mode="a", header=not a.out.exists(), index=False)
                pcc = {f"{r['model']}/{r['genes']}": round(r["value"], 3) for r in rows if r["metric"] == "pcc"}
                print(f"{fold.name:12s} {name:22s} {budget:.2f} s{seed} sel {t_sel:5.1f}s {pcc}", flush=True)
    summarize(pd.read_csv(a.out))


def summarize(df: pd.DataFrame, *, metric: str = "pcc") -> pd.DataFrame:
    """Mean ± sd over seeds of the per-seed fold-group means (C LOSO: mean of its 5 folds), per sampler/budget."""
    sub = df[df["metric"] == metric].copy()
    sub["group"] = np.where(sub["fold"].str.startswith("C LOSO"), "C LOSO", sub["fold"])
    # per seed: average the folds of a group first, then mean ± sd over seeds
    per_seed = sub.groupby(["model", "genes", "group", "sampler", "budget", "seed"])["value"].mean()
    g = per_seed.groupby(["model", "genes", "group", "sampler", "budget"])
    tab = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n_seeds": g.size()})
    out = tab["mean"].map("{:.3f}".format) + " ± " + tab["sd"].map("{:.3f}".format)
    with pd.option_context("display.width", 250, "display.max_rows", 500):
        print(out.unstack(["group", "budget"]).to_string())
    return tab


def held_out(df: pd.DataFrame, *, metric: str = "pcc") -> pd.DataFrame:
    """Per model/genes/sampler/budget: mean ± sd over seeds of C LOSO (mean of its folds), C→A1 and their mean.

    ``held-out`` is, per seed, the mean of the two groups (C LOSO's five folds count as one group, so
    the other patient weighs as much as patient C), then mean ± sd over seeds. Only seeds with every
    fold of both groups count.
    """
    sub = df[df["metric"] == metric].copy()
    sub["group"] = np.where(sub["fold"].str.startswith("C LOSO"), "C LOSO", sub["fold"])
    keys = ["model", "genes", "sampler", "budget", "seed"]
    n_folds = sub.groupby(keys)["fold"].nunique()
    per = sub.groupby([*keys, "group"])["value"].mean().unstack("group").reindex(columns=["C LOSO", "C→A1"])
    per = per[n_folds.reindex(per.index) == 6]
    per["held-out"] = per[["C LOSO", "C→A1"]].mean(1)
    g = per.groupby(["model", "genes", "sampler", "budget"])
    out = {}
    for col in ["C LOSO", "C→A1", "held-out"]:
        out[(col, "mean")] = g[col].mean()
        out[(col, "sd")] = g[col].std(ddof=1)
    out[("n_seeds", "")] = g.size()
    return pd.DataFrame(out)


def markdown(df: pd.DataFrame, *, metric: str = "pcc") -> str:
    """Markdown tables (one per downstream model × gene set): sampler × budget, C LOSO / C→A1 / held-out."""
    tab = held_out(df, metric=metric)
    lines = []
    for (model, genes), t in tab.groupby(level=["model", "genes"]):
        t = t.droplevel(["model", "genes"])
        budgets = sorted(t.index.get_level_values("budget").unique())
        lines += [f"### {model}, {genes} ({metric}, mean ± sd over seeds)", "",
                  "| sampler | " + " | ".join(f"{c} {b:.0%}" for c in ["C LOSO", "C→A1", "held-out"]
                                               for b in budgets) + " | seeds |",
                  "|---|" + "---|" * (3 * len(budgets) + 1)]
        order = t[("held-out", "mean")].groupby(level="sampler").mean().sort_values(ascending=False).index
        for smp in order:
            cells = []
            for c in ["C LOSO", "C→A1", "held-out"]:
                for b in budgets:
                    if (smp, b) in t.index:
                        m, sd = t.loc[(smp, b), (c, "mean")], t.loc[(smp, b), (c, "sd")]
                        cells.append(f"{m:.3f} ± {sd:.3f}")
                    else:
                        cells.append("—")
            n = t.loc[smp, ("n_seeds", "")].min()
            lines.append(f"| {smp} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
