"""Simulated active annotation on HER2ST (ActiveVisium protocol), single thread.

A1: pathologist labels (``obs['pathologist_label']``, 346 spots, rounds of 55).
C2–C6: expression-cluster labels (``obs['expression_cluster']``, ~180 spots, rounds of 20).
Features: EfficientNet-Lite0 from ``si.pp.embed`` via the shared protocol's ``load()``
(set ``STIMG_BENCH_CACHE`` for the cached features).

For every section, seed and rule: labels hidden, initial k-means set (+ one spot of each
missed class), then per round train → score against the hidden labels → reveal ``n_new``
spots chosen by the rule. Reports weighted F1 per round (mean ± sd over seeds) and whether
the active rule is ≥ random at rounds 2–5.

    OMP_NUM_THREADS=1 STIMG_BENCH_CACHE=/work/cache/bench_embed \\
        python benchmarks/annotation_her2st.py --out benchmarks/results/annotation_her2st
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _protocol import C_SECTIONS, CROSS_PATIENT, EMBED_KEY, load  # noqa: E402

import stimg as si  # noqa: E402
from stimg.tl import UncertaintyRule, least_confidence, register_annotation_rule  # noqa: E402

LABELS = {CROSS_PATIENT: "pathologist_label", **{s: "expression_cluster" for s in C_SECTIONS}}


def paired(df: pd.DataFrame, active: str, metric: str = "weighted_f1") -> pd.DataFrame:
    """Per section and round: mean ± sd over seeds of (active − random) and seeds where active ≥ random.

    Runs of one seed share the initial set and the model seed, so the per-seed difference is paired.
    """
    sub = df[(df["metric"] == metric) & df["rule"].isin([active, "random"])]
    wide = sub.pivot_table(index=["section", "round", "seed"], columns="rule", values="value")
    diff = (wide[active] - wide["random"]).rename("diff").reset_index()
    g = diff.groupby(["section", "round"], sort=False)["diff"]
    return pd.DataFrame({"mean_diff": g.mean(), "sd_diff": g.std(ddof=1),
                         "seeds_active_ge_random": g.apply(lambda d: int((d >= -1e-12).sum())), "n_seeds": g.size()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", default=[CROSS_PATIENT, *C_SECTIONS])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rules", nargs="+", default=["least_confidence", "random"])
    p.add_argument("--active", default="least_confidence", help="rule compared with random in the verdict")
    p.add_argument("--pool-factors", nargs="*", type=float, default=[],
                   help="also register least_confidence variants 'lc_pool{f}' with these pool factors")
    p.add_argument("--expression", action="store_true",
                   help="multimodal: add the expression branch (1,000 HVGs of the section); circular for C2–C6, "
                        "whose labels are expression clusters")
    p.add_argument("--context-um", type=float, default=0.0,
                   help="> 0: classify on si.pp.spatial_context features (own + neighbours' mean within this radius)")
    p.add_argument("--train-kwargs", type=json.loads, default=None,
                   help='JSON of SpotClassifier.train options, e.g. \'{"warm_start": false}\'')
    p.add_argument("--out", default="benchmarks/results/annotation_her2st")
    args = p.parse_args()
    torch.set_num_threads(1)
    si.settings.progress = False
    rules = list(args.rules)
    for f in args.pool_factors:
        name = f"lc_pool{f:g}"
        register_annotation_rule(name, UncertaintyRule(least_confidence, pool_factor=f), overwrite=True)
        rules.append(name)
    t0 = time.perf_counter()
    table = load([s for s in [*C_SECTIONS, CROSS_PATIENT] if s in args.sections])
    print(f"loaded {table.n_obs} spots in {time.perf_counter() - t0:.0f}s", flush=True)
    frames, timing = [], {}
    for sec in args.sections:
        sub = table[table.obs["library_id"].astype(str) == sec].copy()
        key = LABELS[sec]
        n_lab = int(sub.obs[key].notna().sum())
        n_new = 55 if n_lab >= 300 else 20
        emb_key = EMBED_KEY
        if args.context_um > 0:  # image only: the neighbourhood of each spot's patch features
            si.pp.spatial_context(sub, EMBED_KEY, radius_um=args.context_um)
            emb_key = f"{EMBED_KEY}_context"
        c0, w0 = time.process_time(), time.perf_counter()
        res = si.tl.simulate_annotation(sub, key, rules=rules, n_rounds=args.rounds, n_new=n_new, seeds=args.seeds,
                                        embedding_key=emb_key, expression=args.expression,
                                        train_kwargs=args.train_kwargs)
        n_train = res.groupby(["rule", "seed"])["round"].nunique().sum()
        timing[sec] = {"cpu_s_per_round": (time.process_time() - c0) / n_train,
                       "wall_s": time.perf_counter() - w0, "n_spots": n_lab, "n_new": n_new,
                       "n_classes": int(sub.obs[key].nunique())}
        frames.append(res.assign(section=sec, labels=key, n_new=n_new))
        pd.concat(frames, ignore_index=True).to_csv(f"{args.out}.partial.csv", index=False)
        s = si.tl.annotation_summary(res).loc["weighted_f1"]
        print(f"\n{sec} ({key}, {n_lab} spots, rounds of {n_new}, "
              f"{timing[sec]['cpu_s_per_round']:.2f} CPU s per round)", flush=True)
        print((s["mean"].round(3).astype(str) + " ± " + s["sd"].round(3).astype(str)).unstack("rule").to_string(),
              flush=True)
    df = pd.concat(frames, ignore_index=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(f"{out}.csv", index=False)
    Path(f"{out}.partial.csv").unlink(missing_ok=True)
    # verdict: active ≥ random (mean over seeds) at rounds 2–5, weighted F1 of the model on all spots
    verdict = {}
    for metric in ("weighted_f1", "weighted_f1_unlabelled", "misclassified_pct"):
        g = df[df["metric"] == metric].groupby(["section", "rule", "round"])["value"]
        m, sd = g.mean().unstack("rule"), g.std(ddof=1).unstack("rule")
        for cand in [r for r in rules if r != "random"]:
            for sec in args.sections:
                rows = m.loc[sec].loc[2:5]
                diff = rows[cand] - rows["random"]
                ok = (diff >= 0) if metric != "misclassified_pct" else (diff <= 0)
                verdict.setdefault(metric, {}).setdefault(cand, {})[sec] = {
                    "active_ge_random_rounds_2_5": bool(ok.all()),
                    "per_round": {int(r): {"active": float(rows.loc[r, cand]), "active_sd": float(sd.loc[(sec, r), cand]),
                                           "random": float(rows.loc[r, "random"]),
                                           "random_sd": float(sd.loc[(sec, r), "random"])}
                                  for r in rows.index},
                }
    paired_tables = {cand: paired(df, cand) for cand in rules if cand != "random"}
    for cand, tab in paired_tables.items():
        tab.round(4).to_csv(f"{out}.paired_{cand}.csv")
    meta = {"command": " ".join(sys.argv), "seeds": args.seeds, "rounds": args.rounds, "rules": rules,
            "features": EMBED_KEY + (f" + spatial context {args.context_um:g} µm" if args.context_um > 0 else "")
            + (" + 1000 HVGs" if args.expression else ""), "train_kwargs": args.train_kwargs, "threads": torch.get_num_threads(), "timing": timing, "verdict": verdict}
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1))
    print("\nactive ≥ random at rounds 2–5 (weighted F1, model on all spots):")
    for cand, secs in verdict["weighted_f1"].items():
        print(f"  {cand}: " + ", ".join(f"{s} {'yes' if v['active_ge_random_rounds_2_5'] else 'NO'}"
                                        for s, v in secs.items()))
    print(f"\npaired difference {args.active} − random (weighted F1; mean ± sd over seeds, seeds with ≥):")
    t = paired_tables.get(args.active)
    if t is not None:
        print((t["mean_diff"].round(3).astype(str) + " ± " + t["sd_diff"].round(3).astype(str) + " ("
               + t["seeds_active_ge_random"].astype(str) + "/" + t["n_seeds"].astype(str) + ")").unstack("round")
              .to_string())
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {out}.csv and {out}.json")


if __name__ == "__main__":
    main()
