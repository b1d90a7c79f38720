"""PCC vs budget on real HER2ST (patient C): every sampling method, ridge on EfficientNet-Lite0 features.

The pool is C2–C6 minus the held-out section; the held-out section is only ever predicted.
Image features come from ``si.pp.embed`` (offline EfficientNet-Lite0, ``obsm['X_efficientnet_lite0']``),
cached as an h5ad (``--features``) so repeated runs skip the embedding.

Usage::

    python benchmarks/her2st_sampling.py --test C6 --seeds 0 1 2 3 4
    python benchmarks/her2st_sampling.py --test C5 --drop C6 --methods random scrl   # development split

Writes ``benchmarks/results/her2st_sampling_<tag>.csv`` (tidy) and ``..._summary.csv`` (mean ± sd).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL = ["C2", "C3", "C4", "C5", "C6"]


def load(features: Path, datadir: str):
    import anndata as ad

    import stimg as si

    if features.exists():
        return ad.read_h5ad(features)
    si.settings.datadir = datadir
    sdata = si.datasets.her2st(ALL)
    si.pp.embed(sdata, "efficientnet_lite0")
    tab = sdata.tables["table"]
    out = ad.AnnData(X=tab.X, obs=tab.obs, var=tab.var, obsm=dict(tab.obsm))
    features.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(features)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test", default="C6")
    p.add_argument("--drop", nargs="*", default=[], help="sections left out entirely (development splits)")
    p.add_argument("--methods", nargs="+", default=["random", "uncertainty", "diversity", "grid", "kmeans", "scrl"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--weights", type=float, nargs=3, default=None, help="SCRL (w_sc, w_type, w_spa)")
    p.add_argument("--no-reference", action="store_true", help="SCRL without the single-cell prior")
    p.add_argument("--encoder", default="scvi")
    p.add_argument("--features", type=Path, default=Path("/tmp/si_as/her2st_C_eff.h5ad"))
    p.add_argument("--datadir", default="/work/shared/data")
    p.add_argument("--tag", default=None)
    p.add_argument("--ablation", action="store_true",
                   help="also run SCRL with biological reward only (w_spa=0) and spatial only (w_sc=w_type=0)")
    a = p.parse_args()

    import stimg as si

    si.settings.datadir = a.datadir
    si.settings.progress = False
    t0 = time.perf_counter()
    adata = load(a.features, a.datadir)
    keep = ~adata.obs["library_id"].isin(a.drop).to_numpy()
    adata = adata[keep].copy()
    ref = None if a.no_reference else si.datasets.her2st_sc_reference()
    w = tuple(a.weights) if a.weights is not None else (20.0, 5.0, 10.0)
    common = {"test": a.test, "seeds": a.seeds, "embedding_key": "X_efficientnet_lite0", "library_key": "library_id"}
    kw = {"scrl": {"weights": w}}
    if ref is not None and "scrl" in a.methods:  # one prior for every SCRL run (pool genes only)
        from stimg.models import SingleCellPrior

        pool_genes = adata.var_names
        t1 = time.perf_counter()
        kw["scrl"]["prior"] = SingleCellPrior(ref, "celltype_major", encoder=a.encoder).fit(pool_genes)
        print(f"prior fitted in {time.perf_counter() - t1:.1f}s", flush=True)
    res = si.tl.simulate_sampling(adata, a.methods, a.budgets, method_kwargs=kw, **common)
    if a.ablation:
        parts = [res]
        for name, wa in (("scrl_bio_only", (w[0], w[1], 0.0)), ("scrl_spatial_only", (0.0, 0.0, w[2]))):
            r = si.tl.simulate_sampling(adata, ["scrl"], a.budgets,
                                        method_kwargs={"scrl": {**kw["scrl"], "weights": wa}}, **common)
            r["method"] = name
            parts.append(r)
        import pandas as pd

        for part in parts:
            part.attrs = {}
        res = pd.concat(parts, ignore_index=True)
        res.attrs["summary"] = si.tl._simulate.sampling_summary(res)
    tag = a.tag or f"test{a.test}"
    out = HERE / "results" / f"her2st_sampling_{tag}.csv"
    out.parent.mkdir(exist_ok=True)
    res.to_csv(out, index=False)
    summ = res.attrs["summary"]
    summ.to_csv(out.with_name(out.stem + "_summary.csv"))
    pcc = summ.xs("pcc", level="metric")
    print(pcc.to_string())
    print(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                      "seconds": round(time.perf_counter() - t0, 1), "csv": str(out)}))


if __name__ == "__main__":
    main()
