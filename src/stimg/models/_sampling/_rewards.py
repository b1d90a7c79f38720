"""SCRL rewards (SCR²-ST, Eq. 2–7): single-cell coverage, cell-type entropy, spatial spread.

Plain numpy/scipy (no torch), vectorised, no N×N matrices: nearest-sample distances come from
:class:`scipy.spatial.cKDTree`, pairwise dispersion is accumulated incrementally in blocks.

Coordinates are expected in *tissue units* (see :func:`normalise_coordinates`): each section's
spot coordinates divided by its size, so ``R_spa`` is comparable across sections and slides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

_EPS = 1e-12
#: Cap on a spot's distance to its nearest sample (tissue units): a section with no sample yet
#: contributes this much, not the distance to another section.
MAX_COVER_DIST = 1.0


def coverage_reward(cluster_ids: np.ndarray, n_clusters: int) -> float:
    """Fraction of the ``n_clusters`` reference clusters hit by the sampled spots (Eq. 2).

    Parameters
    ----------
    cluster_ids
        Nearest-centroid index of each sampled spot (``-1``: unknown, ignored).
    n_clusters
        Number of centroids ``C``.

    Examples
    --------
    >>> coverage_reward(np.array([0, 0, 2]), 4)
    0.5
    """
    ids = np.asarray(cluster_ids)
    ids = ids[ids >= 0]
    return float(np.unique(ids).size / max(int(n_clusters), 1))


def type_entropy_reward(type_ids: np.ndarray, n_types: int) -> float:
    """Normalised entropy of the sampled spots' cell types (Eq. 4).

    Normalised by ``log(n_types)`` (all types of the reference), so sampling two types evenly
    scores below sampling all types evenly; the paper divides by the number of *observed*
    types, which scores any even split as 1.

    Examples
    --------
    >>> round(float(type_entropy_reward(np.array([0, 1, 2, 3]), 4)), 6)
    1.0
    >>> bool(type_entropy_reward(np.array([1, 1, 1]), 4) == 0)
    True
    """
    ids = np.asarray(type_ids)
    ids = ids[ids >= 0]
    if ids.size == 0 or n_types < 2:
        return 0.0
    p = np.bincount(ids, minlength=n_types).astype(np.float64) / ids.size
    return _entropy(p) / np.log(n_types)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def dispersion(xy: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Mean pairwise distance among sampled points, within sections (``D_disp``, Eq. 5).

    Examples
    --------
    >>> dispersion(np.array([[0.0, 0.0], [3.0, 4.0]]))
    2.5
    """
    xy = np.asarray(xy, dtype=np.float64)
    g = np.zeros(len(xy), dtype=np.int64) if groups is None else np.asarray(groups)
    total, n2 = 0.0, 0
    for s in np.unique(g):
        p = xy[g == s]
        total += _pair_sum(p, p)
        n2 += len(p) ** 2
    return total / n2 if n2 else 0.0


def _pair_sum(a: np.ndarray, b: np.ndarray, block: int = 1 << 21) -> float:
    """Σ_ij ‖a_i − b_j‖ in blocks of at most ``block`` distances (:func:`scipy.spatial.distance.cdist`).

    ``cdist`` computes each block in C without the ``(i, j, 2)`` difference array: 10× faster
    than numpy broadcasting on 5,000 × 2,000 points.
    """
    if len(a) == 0 or len(b) == 0:
        return 0.0
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    step = max(1, block // max(len(b), 1))
    out = 0.0
    for i in range(0, len(a), step):
        out += float(cdist(a[i:i + step], b).sum())
    return out


def cover_distance(xy_all: np.ndarray, xy_sampled: np.ndarray, *, cap: float = MAX_COVER_DIST) -> np.ndarray:
    """Distance from every spot to its nearest sampled spot (k-d tree), capped at ``cap``."""
    if len(xy_sampled) == 0:
        return np.full(len(xy_all), cap)
    d, _ = cKDTree(xy_sampled).query(xy_all, k=1, distance_upper_bound=cap)
    return np.minimum(d, cap)


def spatial_reward(xy_all: np.ndarray, sampled: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Spatial spread of the sampled spots: ``(D_disp − D_cover) / 2`` (Eq. 5–6, sign fixed).

    ``D_disp`` (mean pairwise distance among samples, within sections) rewards dispersion;
    ``D_cover`` (mean distance from every spot to its nearest sample) is *subtracted*, so
    worse coverage lowers the reward (the reference code adds it). Both are in the units of
    ``xy_all``; pass coordinates from :func:`normalise_coordinates` to scale by tissue size.

    Parameters
    ----------
    xy_all
        ``(n, 2)`` coordinates of all candidate spots.
    sampled
        Integer indices (or boolean mask) of the sampled spots.
    groups
        Section of each spot; pairs across sections are not counted.

    Examples
    --------
    >>> xy = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    >>> spatial_reward(xy, np.array([0, 2])) > spatial_reward(xy, np.array([0, 1]))
    True
    """
    xy_all = np.asarray(xy_all, dtype=np.float64)
    idx = np.flatnonzero(sampled) if np.asarray(sampled).dtype == bool else np.asarray(sampled, dtype=np.int64)
    g = np.zeros(len(xy_all), dtype=np.int64) if groups is None else np.asarray(groups)
    d_disp = dispersion(xy_all[idx], g[idx])
    d_cover = float(cover_distance(xy_all, xy_all[idx]).mean())
    return 0.5 * (d_disp - d_cover)


def normalise_coordinates(xy: np.ndarray, groups: np.ndarray | None = None, *, gap: float = 10.0) -> np.ndarray:
    """Coordinates in tissue units: per section, centred and divided by ``sqrt`` of its bounding-box area.

    Sections are then placed ``gap`` units apart so k-d trees over all sections never match
    a spot to a sample of another section (distances are capped at :data:`MAX_COVER_DIST`).
    """
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    g = np.zeros(len(xy), dtype=np.int64) if groups is None else np.asarray(groups)
    out = np.empty_like(xy)
    for j, s in enumerate(np.unique(g)):
        m = g == s
        p = xy[m]
        lo, hi = p.min(0), p.max(0)
        ext = np.maximum(hi - lo, _EPS)
        size = float(np.sqrt(ext[0] * ext[1])) if ext.min() > 1e-9 * ext.max() else float(ext.max())
        out[m] = (p - lo) / max(size, _EPS)
        out[m, 0] += j * gap
    return out


@dataclass
class RewardWeights:
    """Reward weights: ``R = w_sc·R_sc + w_type·R_type + w_spa·R_spa + w_img·R_img`` (+ ``w_unc·R_unc``).

    Eq. 7 of SCR²-ST plus two terms that are not in the paper: ``img`` (image-feature coverage, :func:`image_coverage_reward`) and ``unc`` (the model's MC-dropout
    uncertainty at the chosen spots) are not in SCR²-ST; their default weight is 0 here.
    """

    sc: float = 20.0
    type: float = 5.0
    spa: float = 10.0
    img: float = 0.0
    unc: float = 0.0

    def __post_init__(self) -> None:
        for k, v in self.as_dict().items():
            if not np.isfinite(v) or v < 0:
                msg = f"reward weight {k!r} must be a finite number ≥ 0, got {v!r}."
                raise ValueError(msg)

    def as_dict(self) -> dict[str, float]:
        return {"sc": float(self.sc), "type": float(self.type), "spa": float(self.spa), "img": float(self.img),
                "unc": float(self.unc)}


def image_coverage_reward(feat: np.ndarray, sampled: np.ndarray) -> float:
    """How well the sampled spots cover image-feature space: ``1 − mean_i d_i / mean_i d⁰_i``.

    ``d_i`` is the distance from spot ``i`` to its nearest sampled spot in ``feat`` (capped by
    ``d⁰_i``, its distance to the mean feature vector, as if the mean were sampled), so the reward
    is 0 with no sample and 1 when every spot is sampled. The k-medoids objective: the downstream
    model maps image → expression, so training spots should cover the image space.

    Examples
    --------
    >>> f = np.array([[0.0], [0.1], [3.0], [3.1]])
    >>> image_coverage_reward(f, np.array([0, 1, 2, 3]))
    1.0
    >>> image_coverage_reward(f, np.array([0, 2])) > image_coverage_reward(f, np.array([0, 1]))
    True
    """
    feat = np.asarray(feat, dtype=np.float64)
    idx = np.flatnonzero(sampled) if np.asarray(sampled).dtype == bool else np.asarray(sampled, dtype=np.int64)
    d0 = np.linalg.norm(feat - feat.mean(0), axis=1)
    d = np.minimum(d0, nearest_distance(feat, feat[idx])) if len(idx) else d0
    return float(1.0 - d.mean() / max(d0.mean(), _EPS))


def nearest_distance(query: np.ndarray, points: np.ndarray, *, block: int = 1 << 22) -> np.ndarray:
    """Euclidean distance from each query row to its nearest row of ``points`` (blocked matrix products)."""
    q = np.asarray(query, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    if len(p) == 0:
        return np.full(len(q), np.inf)
    pp = (p * p).sum(1)
    out = np.empty(len(q))
    step = max(1, block // max(len(p), 1))
    for i in range(0, len(q), step):
        qb = q[i:i + step]
        d2 = (qb * qb).sum(1)[:, None] + pp[None, :] - 2.0 * qb @ p.T
        out[i:i + step] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


@dataclass
class RewardState:
    """Incremental rewards of a growing sample set; evaluates candidate additions cheaply.

    Holds, for the committed set: the hit clusters, cell-type counts, each spot's distance to
    its nearest sample and the within-section sum of pairwise distances. ``gain(idx, ...)``
    scores adding ``idx`` without changing the state; ``add`` commits it.

    Parameters
    ----------
    xy
        ``(n, 2)`` coordinates in tissue units (:func:`normalise_coordinates`).
    groups
        Integer section of each spot.
    n_clusters, n_types
        Sizes of the biological label spaces (``0`` disables that term).
    weights
        Reward weights.
    feat
        ``(n, d)`` image features for ``R_img`` (:func:`image_coverage_reward`); ``None`` disables it.
    cover_sample
        Above this many spots, ``D_cover`` is averaged over a fixed random subset of this size.
    img_sample
        Likewise for the image-coverage term ``R_img``.
    pair_sample
        Above this many committed samples in a section, distances from a candidate to them are
        summed over a random subset of this size and scaled up (``D_disp`` estimate); likewise
        the distances within a candidate batch larger than this.
    seed
        Seed of that subset.
    """

    xy: np.ndarray
    groups: np.ndarray
    n_clusters: int
    n_types: int
    weights: RewardWeights = field(default_factory=RewardWeights)
    feat: np.ndarray | None = None
    cover_sample: int | None = 20_000
    img_sample: int | None = 5_000
    pair_sample: int | None = 2_000
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.xy)
        # D_cover is a mean over spots: on large sections it is estimated on a fixed random
        # subset (the same before and after each candidate, so gains stay consistent)
        if self.cover_sample is not None and n > self.cover_sample:
            sub = np.sort(np.random.default_rng(self.seed).choice(n, self.cover_sample, replace=False))
        else:
            sub = np.arange(n)
        self._cover_xy = np.asarray(self.xy, dtype=np.float64)[sub]
        if self.feat is not None:
            self.feat = np.asarray(self.feat, dtype=np.float64)
            isub = sub
            if self.img_sample is not None and len(sub) > self.img_sample:  # 50-d distances cost more
                isub = np.sort(np.random.default_rng([self.seed, 1]).choice(sub, self.img_sample, replace=False))
            self._cover_feat = self.feat[isub]
            self.near_img0 = np.linalg.norm(self._cover_feat - self.feat.mean(0), axis=1)
            self.near_img = self.near_img0.copy()
        else:
            self.near_img0 = self.near_img = np.zeros(0)
        self.groups = np.asarray(self.groups, dtype=np.int64)
        self.n_groups = int(self.groups.max()) + 1 if n else 0
        self.sampled = np.zeros(n, dtype=bool)
        self.hit = np.zeros(max(self.n_clusters, 1), dtype=bool)
        self.type_counts = np.zeros(max(self.n_types, 1), dtype=np.int64)
        self.near = np.full(len(sub), MAX_COVER_DIST)
        self.pair_sum = np.zeros(max(self.n_groups, 1))
        self.count = np.zeros(max(self.n_groups, 1), dtype=np.int64)
        self._pair_cache: dict[int, tuple] = {}

    # -- components -------------------------------------------------------------------------
    def _components(self, hit, type_counts, near, pair_sum, count, near_img) -> dict[str, float]:
        r_sc = float(hit.sum() / self.n_clusters) if self.n_clusters else 0.0
        n_t = type_counts.sum()
        r_type = _entropy(type_counts / n_t) / np.log(self.n_types) if (n_t and self.n_types > 1) else 0.0
        nz = count > 0
        d_disp = float(pair_sum[nz].sum() / (count[nz] ** 2).sum()) if nz.any() else 0.0
        r_spa = 0.5 * (d_disp - float(near.mean() if len(near) else 0.0))
        r_img = float(1.0 - near_img.mean() / max(self.near_img0.mean(), _EPS)) if len(near_img) else 0.0
        w = self.weights
        return {"sc": r_sc, "type": float(r_type), "spa": r_spa, "img": r_img,
                "total": w.sc * r_sc + w.type * float(r_type) + w.spa * r_spa + w.img * r_img}

    def current(self) -> dict[str, float]:
        """Reward components of the committed set."""
        return self._components(self.hit, self.type_counts, self.near, self.pair_sum, self.count, self.near_img)

    def _with(self, idx: np.ndarray, clusters: np.ndarray | None, types: np.ndarray | None):
        idx = np.asarray(idx, dtype=np.int64)
        hit = self.hit.copy()
        if clusters is not None and self.n_clusters:
            c = np.asarray(clusters)
            hit[c[c >= 0]] = True
        tc = self.type_counts.copy()
        if types is not None and self.n_types:
            t = np.asarray(types)
            tc += np.bincount(t[t >= 0], minlength=len(tc))[: len(tc)]
        near = np.minimum(self.near, cover_distance(self._cover_xy, self.xy[idx])) if len(idx) else self.near
        near_img = self.near_img
        if len(idx) and len(near_img):
            near_img = np.minimum(near_img, nearest_distance(self._cover_feat, self.feat[idx]))
        ps, cnt = self.pair_sum.copy(), self.count.copy()
        gi = self.groups[idx]
        for s in np.unique(gi):
            new = self.xy[idx[gi == s]]
            old = self._committed_sample(s)
            scale = self.count[s] / max(len(old), 1)
            ps[s] += 2.0 * scale * _pair_sum(new, old) + self._within_sum(new, s)
            cnt[s] += len(new)
        return hit, tc, near, ps, cnt, near_img

    def _within_sum(self, new: np.ndarray, s: int) -> float:
        """Σ_ij ‖new_i − new_j‖, estimated from ``pair_sample`` rows of ``new`` when the batch is larger.

        Exact below ``pair_sample`` points; above, ``k·m`` instead of ``k²`` distances (a batch is
        ``budget / n_rounds`` spots, so the exact sum grew with the square of the number of spots).
        """
        m = self.pair_sample
        if m is None or len(new) <= m:
            return _pair_sum(new, new)
        rows = np.random.default_rng([self.seed, s, len(new), 2]).choice(len(new), m, replace=False)
        return _pair_sum(new[rows], new) * (len(new) / m)

    def _committed_sample(self, s: int) -> np.ndarray:
        """Committed points of section ``s``, or a fixed random ``pair_sample`` of them (cached per state)."""
        key = (s, int(self.count[s]))
        if self._pair_cache.get(s, (None,))[0] != key:
            pts = self.xy[self.sampled & (self.groups == s)]
            if self.pair_sample is not None and len(pts) > self.pair_sample:
                rng = np.random.default_rng([self.seed, s, len(pts)])
                pts = pts[rng.choice(len(pts), self.pair_sample, replace=False)]
            self._pair_cache[s] = (key, pts)
        return self._pair_cache[s][1]

    def evaluate(self, idx: np.ndarray, clusters: np.ndarray | None = None,
                 types: np.ndarray | None = None) -> dict[str, float]:
        """Reward components of the committed set plus ``idx`` (state unchanged)."""
        return self._components(*self._with(idx, clusters, types))

    def gain(self, idx: np.ndarray, clusters: np.ndarray | None = None, types: np.ndarray | None = None) -> float:
        """Increase of the total reward when ``idx`` (with these labels) is added."""
        return self.evaluate(idx, clusters, types)["total"] - self.current()["total"]

    def add(self, idx: np.ndarray, clusters: np.ndarray | None = None, types: np.ndarray | None = None) -> None:
        """Commit ``idx`` to the sample set."""
        idx = np.asarray(idx, dtype=np.int64)
        self.hit, self.type_counts, self.near, self.pair_sum, self.count, self.near_img = self._with(idx, clusters,
                                                                                                   types)
        self.sampled[idx] = True

    def relabel(self, clusters: np.ndarray | None, types: np.ndarray | None) -> None:
        """Recompute the biological terms from labels of all committed spots (``-1`` skipped)."""
        self.hit[:] = False
        self.type_counts[:] = 0
        if clusters is not None and self.n_clusters:
            c = np.asarray(clusters)
            self.hit[c[c >= 0]] = True
        if types is not None and self.n_types:
            t = np.asarray(types)
            self.type_counts += np.bincount(t[t >= 0], minlength=len(self.type_counts))[: len(self.type_counts)]
