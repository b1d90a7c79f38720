"""Variants of the diversity step of least-confidence selection, run through ``annotation_her2st.py``.

Registers, then runs the HER2ST annotation benchmark with the same options (pass the names in
``--rules``; ``--pool-factors`` of that script covers the plain pool-size variants):

- ``lc_w{f}``: pool = max(top 5 %, f · n_new) most uncertain; k-means weighted by the
  least-confidence score (Zhdanov 2019, "Diverse mini-batch active learning"); nearest to each centroid.
- ``lc_mu{f}``: the same pool; plain k-means; the most uncertain spot of each cluster.
- ``lc_id``: information density (Settles & Craven 2008): the ``n_new`` candidates with the highest
  least-confidence × mean cosine similarity to all candidates (model latent space), i.e. uncertain
  spots in dense regions rather than outliers.
- ``coverage``: no uncertainty: k-means (``n_new`` clusters) over all candidates in the model's
  latent space, the candidate nearest each centroid (representative spots, like the initial set).

    OMP_NUM_THREADS=1 STIMG_BENCH_CACHE=/work/cache/bench_embed python benchmarks/annotation_variants_her2st.py \\
        --rules least_confidence random lc_w3 lc_mu2 lc_mu3 --seeds 0 1 2 3 4 --rounds 6 \\
        --out benchmarks/results/annotation_her2st_variants
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from stimg.tl import AnnotationRule, least_confidence, register_annotation_rule  # noqa: E402


class PoolClusterRule(AnnotationRule):
    """Top-uncertain pool (≥ ``factor · n_new``) → k-means → one spot per cluster (see module docstring)."""

    def __init__(self, factor: float, *, weighted: bool, pick_most_uncertain: bool) -> None:
        self.factor, self.weighted, self.pick_most_uncertain = factor, weighted, pick_most_uncertain

    def select(self, ctx, n_new, rng):  # noqa: D102
        from sklearn.cluster import KMeans

        from stimg.models._sampling._baselines import _nearest_unique

        cand = np.asarray(ctx.candidates)
        s = least_confidence(ctx.proba[cand])
        order = np.lexsort((rng.random(len(cand)), -s))
        n_pool = int(min(len(cand), max(np.ceil(0.05 * len(cand)), np.ceil(self.factor * n_new))))
        pool, sp = cand[order[:n_pool]], s[order[:n_pool]]
        if n_pool <= n_new:
            return pool[:n_new]
        x = np.asarray(ctx.features, dtype=np.float64)
        km = KMeans(n_new, n_init=3, random_state=int(rng.integers(2**31)))
        km.fit(x[pool], sample_weight=sp if self.weighted else None)
        if not self.pick_most_uncertain:
            return np.asarray(_nearest_unique(x, km.cluster_centers_, pool), dtype=np.int64)
        return np.asarray([pool[m[np.argmax(sp[m])]] for m in (np.flatnonzero(km.labels_ == c) for c in range(n_new))
                           if m.size], dtype=np.int64)


class DensityWeightedRule(AnnotationRule):
    """Least-confidence × mean cosine similarity to the candidates (information density, β = 1)."""

    def select(self, ctx, n_new, rng):  # noqa: D102
        cand = np.asarray(ctx.candidates)
        x = np.asarray(ctx.features, dtype=np.float64)[cand]
        x = x - x.mean(0)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        density = (x @ x.mean(0) + 1) / 2  # mean cosine similarity, mapped to [0, 1]
        s = least_confidence(ctx.proba[cand]) * density
        return cand[np.lexsort((rng.random(len(cand)), -s))[:n_new]]


class CoverageRule(AnnotationRule):
    """k-means over all candidates (model latent space), the candidate nearest each centroid."""

    def select(self, ctx, n_new, rng):  # noqa: D102
        from stimg.tl._annotation_rules import diverse_centroids

        return diverse_centroids(ctx.features, np.asarray(ctx.candidates), n_new, rng)


register_annotation_rule("lc_id", DensityWeightedRule(), overwrite=True)
register_annotation_rule("coverage", CoverageRule(), overwrite=True)
for f in (2, 3):
    register_annotation_rule(f"lc_w{f}", PoolClusterRule(f, weighted=True, pick_most_uncertain=False), overwrite=True)
    register_annotation_rule(f"lc_mu{f}", PoolClusterRule(f, weighted=False, pick_most_uncertain=True), overwrite=True)

if __name__ == "__main__":
    import annotation_her2st

    annotation_her2st.main()
