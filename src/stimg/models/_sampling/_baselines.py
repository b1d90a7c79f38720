"""Baseline samplers for active sampling: random, grid, k-means, diversity, uncertainty.

The selection rules (``*_select``) return the chosen spot indices in selection order, never one of
``exclude``; the sampler classes wrap them in the one :class:`~stimg.tl.Sampler` signature
``select(ctx)``. Only the uncertainty sampler needs torch (imported lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ..._utils import torch_threads


def _free(n: int, exclude: np.ndarray | None) -> np.ndarray:
    ok = np.ones(n, dtype=bool)
    if exclude is not None:
        ok[np.asarray(exclude, dtype=np.int64)] = False
    return ok


def random_select(n: int, budget: int, rng: np.random.Generator, *, exclude: np.ndarray | None = None) -> np.ndarray:
    """``budget`` spots uniformly at random."""
    free = np.flatnonzero(_free(n, exclude))
    return rng.choice(free, size=min(budget, free.size), replace=False)


def _standardise_pca(x: np.ndarray, n_comps: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float32)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    k = min(n_comps, x.shape[1], max(x.shape[0] - 1, 1))
    if k >= x.shape[1]:
        return x
    return PCA(k, random_state=seed, svd_solver="randomized").fit_transform(x).astype(np.float32)


def _nearest_unique(x: np.ndarray, centres: np.ndarray, candidates: np.ndarray) -> list[int]:
    """For each centre (in order), the nearest candidate not already taken."""
    tree = cKDTree(x[candidates])
    taken: set[int] = set()
    out = []
    kk = min(len(candidates), 16)
    _, nn_all = tree.query(np.asarray(centres), k=kk)  # one vectorised query; conflicts resolved in order
    nn_all = np.asarray(nn_all).reshape(len(centres), -1)
    for c, nn in zip(centres, candidates[nn_all], strict=True):
        j = next((int(i) for i in nn if int(i) not in taken), None)
        k = kk
        while j is None:  # crowded: look further (at most len(taken) + 1 neighbours are ever needed)
            k = min(4 * k, len(candidates))
            _, far = tree.query(c, k=k)
            j = next((int(candidates[i]) for i in np.atleast_1d(far) if int(candidates[i]) not in taken), None)
        taken.add(j)
        out.append(j)
    return out


#: Above this many (free spots × budget), :func:`kmeans_select` runs k-means in two levels.
FLAT_KMEANS_MAX_WORK = 200_000_000


def _kmeans(x: np.ndarray, k: int, seed: int):
    from sklearn.cluster import KMeans, MiniBatchKMeans

    km = (KMeans(k, n_init=1, random_state=seed) if len(x) <= 20_000
          else MiniBatchKMeans(k, n_init=1, random_state=seed, batch_size=4096))
    return km.fit(x)


def _two_level_select(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` rows of ``x`` by k-means in two levels: ``≈√k`` coarse clusters, then each one's share of ``k``.

    Cost ``O(n·√k)`` per iteration instead of ``O(n·k)``; coarse clusters get centres in proportion
    to their size (largest remainder), as flat k-means places them by density. Each fine cluster
    contributes its member nearest its centroid (a nearest-neighbour search over all rows would cost
    ``O(n·k)`` again in 50 dimensions); an empty fine cluster takes the nearest unpicked row of its
    coarse cluster.
    """
    g = int(min(max(2, round(np.sqrt(k))), k))
    labels = _kmeans(x, g, seed).labels_
    sizes = np.bincount(labels, minlength=g)
    share = _largest_remainder(k, sizes)
    order = np.argsort(labels, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]
    picks = []
    for j in np.flatnonzero(share):
        mem = order[bounds[j]:bounds[j + 1]]
        if share[j] >= len(mem):
            picks.append(mem)
            continue
        km = _kmeans(x[mem], int(share[j]), seed + 1 + int(j))
        lab, cen = km.labels_, km.cluster_centers_
        d = ((x[mem] - cen[lab]) ** 2).sum(1)
        o = np.lexsort((d, lab))
        first = o[np.r_[True, lab[o][1:] != lab[o][:-1]]]  # per non-empty cluster, its nearest member
        picks.append(mem[first])
        empty = np.setdiff1d(np.arange(len(cen)), lab[first])
        if len(empty):
            rest = np.setdiff1d(np.arange(len(mem)), first)
            picks.append(mem[np.asarray(_nearest_unique(x[mem], cen[empty], rest), dtype=np.int64)])
    return np.concatenate(picks)


def kmeans_select(emb: np.ndarray, budget: int, rng: np.random.Generator, *, exclude: np.ndarray | None = None,
                  n_comps: int = 50) -> np.ndarray:
    """k-means (``budget`` clusters) on standardised PCA image embeddings; the spot nearest each centroid.

    When free spots × ``budget`` exceeds :data:`FLAT_KMEANS_MAX_WORK` (e.g. 100k spots, 10 %
    budget), k-means runs in two levels (:func:`_two_level_select`), so the cost grows with
    ``n·√budget`` instead of ``n·budget``.
    """
    free = np.flatnonzero(_free(len(emb), exclude))
    budget = min(budget, free.size)
    if budget == 0:
        return np.array([], dtype=np.int64)
    x = _standardise_pca(emb, n_comps, int(rng.integers(2**31)))
    seed = int(rng.integers(2**31))
    if free.size * budget > FLAT_KMEANS_MAX_WORK:
        return free[_two_level_select(x[free], budget, seed)]
    centres = _kmeans(x[free], budget, seed).cluster_centers_
    return np.asarray(_nearest_unique(x, centres, free), dtype=np.int64)


def grid_select(xy: np.ndarray, groups: np.ndarray, budget: int, rng: np.random.Generator, *,
                exclude: np.ndarray | None = None) -> np.ndarray:
    """Spatially uniform: per section, a square lattice (random offset) sized to the section's share.

    The lattice spacing is bisected so that about the section's share of the budget lattice
    cells hold a spot; the spot nearest each occupied cell centre is taken; any shortfall is
    filled at random and any excess dropped at random.
    """
    xy = np.asarray(xy, dtype=np.float64)
    g = np.asarray(groups)
    ok = _free(len(xy), exclude)
    free_all = np.flatnonzero(ok)
    budget = min(budget, free_all.size)
    secs = np.unique(g[free_all])
    sizes = np.array([(g[free_all] == s).sum() for s in secs])
    share = _largest_remainder(budget, sizes)
    out: list[int] = []
    for s, b in zip(secs, share, strict=True):
        if b == 0:
            continue
        cand = free_all[g[free_all] == s]
        p = xy[cand]
        lo, hi = p.min(0), p.max(0)
        off = rng.uniform(0, 1, size=2)

        def cells(h: float, p=p, lo=lo, off=off) -> dict:
            key = np.floor((p - lo) / h + off).astype(np.int64)
            centre = (key + 0.5 - off) * h + lo
            d = ((p - centre) ** 2).sum(1)
            order = np.lexsort((d, key[:, 1], key[:, 0]))
            k = key[order]
            first = np.r_[True, (k[1:] != k[:-1]).any(1)]
            return order[first]

        span = float(max((hi - lo).max(), 1e-9))
        a, bb = span / 1e4, span * 2
        picked = cells(bb)
        for _ in range(40):
            mid = np.sqrt(a * bb)
            c = cells(mid)
            if len(c) >= b:
                a, picked = mid, c
            else:
                bb = mid
        if len(picked) < b:
            picked = cells(a)
        chosen = cand[picked]
        if len(chosen) > b:
            chosen = rng.choice(chosen, size=b, replace=False)
        elif len(chosen) < b:
            rest = np.setdiff1d(cand, chosen)
            chosen = np.r_[chosen, rng.choice(rest, size=b - len(chosen), replace=False)]
        out.extend(int(i) for i in chosen)
    return np.asarray(out, dtype=np.int64)


def _largest_remainder(total: int, sizes: np.ndarray) -> np.ndarray:
    sizes = np.asarray(sizes, dtype=np.float64)
    q = total * sizes / max(sizes.sum(), 1)
    base = np.floor(q).astype(np.int64)
    base = np.minimum(base, sizes.astype(np.int64))
    for i in np.argsort(-(q - base)):
        if base.sum() >= total:
            break
        if base[i] < sizes[i]:
            base[i] += 1
    return base


def diversity_select(emb: np.ndarray, budget: int, rng: np.random.Generator, *,
                     exclude: np.ndarray | None = None, n_comps: int = 128) -> np.ndarray:
    """Diversity sampling (Zhdanov 2019, as in SCR²-ST): PCA-128, DBSCAN, k-means fallback, uniform per cluster.

    Features are standardised and reduced to ``n_comps`` PCs; DBSCAN (``eps`` = median
    distance to the 5th neighbour) clusters them; if it finds fewer than ``√N / 5`` clusters,
    k-means with ``⌈√N / 5⌉`` clusters replaces it. Spots are then drawn round-robin, one per
    cluster at a time in random order (DBSCAN noise forms its own group).
    """
    from sklearn.cluster import DBSCAN, KMeans, MiniBatchKMeans

    free = np.flatnonzero(_free(len(emb), exclude))
    budget = min(budget, free.size)
    if budget == 0:
        return np.array([], dtype=np.int64)
    x = _standardise_pca(emb, n_comps, int(rng.integers(2**31)))[free]
    n = len(free)
    min_clusters = max(1, int(np.ceil(np.sqrt(n) / 5)))
    labels = None
    if n <= 20_000:  # DBSCAN's neighbourhoods are costly beyond that
        d5, _ = cKDTree(x).query(x, k=min(6, n))
        eps = float(np.median(np.atleast_2d(d5)[:, -1])) or 1e-6
        lab = DBSCAN(eps=eps, min_samples=5).fit_predict(x)
        if len(set(lab[lab >= 0])) >= min_clusters:
            labels = lab
    if labels is None:
        seed = int(rng.integers(2**31))
        km = (KMeans(min_clusters, n_init=1, random_state=seed) if n <= 20_000
              else MiniBatchKMeans(min_clusters, n_init=1, random_state=seed, batch_size=4096))
        labels = km.fit_predict(x)
    pools = [rng.permutation(free[labels == c]).tolist() for c in rng.permutation(np.unique(labels))]
    out: list[int] = []
    while len(out) < budget:
        for pool in pools:
            if pool and len(out) < budget:
                out.append(pool.pop())
    return np.asarray(out, dtype=np.int64)


def uncertainty_select(emb: np.ndarray, targets: Callable[[np.ndarray], np.ndarray], budget: int,
                       rng: np.random.Generator, *, exclude: np.ndarray | None = None, n_rounds: int = 5,
                       dropout: float = 0.1, n_passes: int = 20, n_hidden: int = 256, epochs: int = 100,
                       on_round: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray]:
    """MC-dropout uncertainty sampling (Safaei et al. 2024, as in SCR²-ST).

    Rounds: the first is random; then a small MLP (embedding → ``n_hidden`` → dropout
    ``p`` → genes) is trained on the revealed spots' targets, ``n_passes`` stochastic forward
    passes score each unsampled spot by the mean per-gene variance, and the top spots are
    taken.

    Parameters
    ----------
    targets
        ``targets(idx) -> (len(idx), g)`` revealed expression (log1p) of spots ``idx``.

    Returns
    -------
    One index array per round.
    """
    import torch

    n = len(emb)
    x = np.asarray(emb, dtype=np.float32)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    xt = torch.as_tensor(x)
    taken = _free(n, exclude)
    taken = ~taken
    sizes = _round_sizes(budget, n_rounds)
    torch.manual_seed(int(rng.integers(2**31)))
    rounds: list[np.ndarray] = []
    revealed: list[int] = list(np.flatnonzero(taken))
    with torch_threads(n):
        for r, k in enumerate(sizes):
            _uncertainty_round(r, k, taken, revealed, rounds, x, xt, targets, rng, dropout, n_passes, n_hidden,
                               epochs, on_round)
    return rounds


def _uncertainty_round(r, k, taken, revealed, rounds, x, xt, targets, rng, dropout, n_passes, n_hidden, epochs,
                       on_round) -> None:
    free = np.flatnonzero(~taken)
    k = min(k, free.size)
    if k == 0:
        return
    if len(revealed) < 2:
        pick = rng.choice(free, size=k, replace=False)
    else:
        idx = np.asarray(revealed, dtype=np.int64)
        score = mc_dropout_variance(xt, idx, np.asarray(targets(idx), dtype=np.float32), free, dropout=dropout,
                                    n_passes=n_passes, n_hidden=n_hidden, epochs=epochs)
        pick = free[np.argsort(-score, kind="stable")[:k]]
    taken[pick] = True
    revealed.extend(int(i) for i in pick)
    rounds.append(np.asarray(pick, dtype=np.int64))
    if on_round is not None:
        on_round(r, pick)


def mc_dropout_variance(xt, train: np.ndarray, y: np.ndarray, query: np.ndarray, *, dropout: float = 0.1,
                        n_passes: int = 20, n_hidden: int = 256, epochs: int = 100) -> np.ndarray:
    """Mean per-gene MC-dropout variance at ``query`` of an MLP trained on ``(xt[train], y)``.

    ``xt``: torch tensor of standardised features of all spots; ``y``: targets of ``train``
    (standardised per gene here). Seed torch before calling for reproducibility.
    """
    import torch
    from torch import nn

    y = torch.as_tensor(y)
    mu, sd = y.mean(0), y.std(0).clamp_min(1e-3)
    net = nn.Sequential(nn.Linear(xt.shape[1], n_hidden), nn.ReLU(), nn.Dropout(dropout),
                        nn.Linear(n_hidden, y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    yy, xx = (y - mu) / sd, xt[np.asarray(train, dtype=np.int64)]
    net.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = ((net(xx) - yy) ** 2).mean()
        loss.backward()
        opt.step()
    query = np.asarray(query, dtype=np.int64)
    score = np.zeros(query.size)
    with torch.no_grad():  # dropout stays on (train mode) for MC sampling
        for start in range(0, query.size, 65536):
            xb = xt[query[start:start + 65536]]
            preds = torch.stack([net(xb) for _ in range(n_passes)])
            score[start:start + len(xb)] = preds.var(0).mean(1).numpy()
    return score


def _round_sizes(budget: int, n_rounds: int) -> list[int]:
    n_rounds = max(1, min(int(n_rounds), int(budget))) if budget > 0 else 1
    return [len(a) for a in np.array_split(np.arange(budget), n_rounds)]


def check_count(value: Any, name: str, *, low: int = 1) -> int:
    """An integer option ``≥ low``, or a ValueError that names it and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        msg = f"{name} must be an integer ≥ {low}, got {value!r}."
        raise ValueError(msg)
    return int(value)


# ----------------------------------------------------------------------------- samplers
class RandomSampler:
    """Uniformly at random (the reference point of every comparison)."""

    def select(self, ctx) -> np.ndarray:
        return random_select(ctx.n_obs, ctx.budget, ctx.rng, exclude=np.flatnonzero(ctx.measured))


class GridSampler:
    """A spatially uniform lattice per section, sized to its share of the budget (coordinates only).

    See :func:`grid_select`.
    """

    def select(self, ctx) -> np.ndarray:
        return grid_select(ctx.coordinates, ctx.groups, ctx.budget, ctx.rng, exclude=np.flatnonzero(ctx.measured))


class KMeansSampler:
    """The spot nearest each of ``budget`` k-means centroids of the standardised image embedding.

    Parameters
    ----------
    n_comps
        PCA components of the standardised embedding before k-means.
    """

    def __init__(self, *, n_comps: int = 50) -> None:
        self.n_comps = check_count(n_comps, "n_comps")

    def select(self, ctx) -> np.ndarray:
        return kmeans_select(ctx.embedding, ctx.budget, ctx.rng, exclude=np.flatnonzero(ctx.measured),
                             n_comps=self.n_comps)


class DiversitySampler:
    """Zhdanov (2019) diversity sampling, as in SCR²-ST (:func:`diversity_select`).

    Parameters
    ----------
    n_comps
        PCA components of the standardised embedding.
    """

    def __init__(self, *, n_comps: int = 128) -> None:
        self.n_comps = check_count(n_comps, "n_comps")

    def select(self, ctx) -> np.ndarray:
        return diversity_select(ctx.embedding, ctx.budget, ctx.rng, exclude=np.flatnonzero(ctx.measured),
                                n_comps=self.n_comps)


class UncertaintySampler:
    """MC-dropout uncertainty sampling (Safaei et al. 2024, as in SCR²-ST; :func:`uncertainty_select`).

    In simulate mode the budget is spent over ``n_rounds`` rounds, each revealing its spots; the
    first round is ``start``. In propose mode one batch is scored from the spots measured so far
    (``start`` when none is measured yet: the lab's first, image-only batch).

    Parameters
    ----------
    n_rounds
        Rounds (simulate mode).
    start
        First batch: ``'random'`` (as in the paper) or ``'kmeans'`` (image k-means).
    n_genes
        Targets: the top-variance genes (log1p) of the revealed spots.
    dropout, n_passes, n_hidden, epochs
        MC-dropout MLP (``p``, ``T``, width, training epochs).
    """

    def __init__(self, *, n_rounds: int = 20, start: str = "random", n_genes: int = 300, dropout: float = 0.1,
                 n_passes: int = 20, n_hidden: int = 256, epochs: int = 100) -> None:
        self.n_rounds = check_count(n_rounds, "n_rounds")
        self.n_genes = check_count(n_genes, "n_genes")
        self.n_passes = check_count(n_passes, "n_passes")
        self.n_hidden = check_count(n_hidden, "n_hidden")
        self.epochs = check_count(epochs, "epochs")
        if start not in ("random", "kmeans"):
            msg = f"start must be 'random' or 'kmeans', got {start!r}."
            raise ValueError(msg)
        if not (0.0 < float(dropout) < 1.0):
            msg = f"dropout must be in (0, 1), got {dropout!r}."
            raise ValueError(msg)
        self.start, self.dropout = start, float(dropout)

    def select(self, ctx) -> list[np.ndarray]:
        measured = np.flatnonzero(ctx.measured)
        n_rounds = self.n_rounds if ctx.can_reveal else 1
        sizes = _round_sizes(ctx.budget, n_rounds)
        rounds: list[np.ndarray] = []
        if len(measured) < 2:  # nothing to learn from yet: the start batch
            first = start_batch(self.start, ctx, sizes[0])
            rounds.append(first)
            if not ctx.can_reveal:
                return rounds
            ctx.reveal(first)
            sizes = sizes[1:]
            measured = np.r_[measured, first]
        if not sizes:
            return rounds

        def targets(idx):
            y = np.log1p(ctx.expression(idx))
            return y[:, np.argsort(-y.var(0))[: self.n_genes]] if y.shape[1] > self.n_genes else y

        done = np.zeros(ctx.n_obs, bool)
        done[measured] = True
        rounds += uncertainty_select(ctx.embedding, targets, int(sum(sizes)), ctx.rng, exclude=np.flatnonzero(done),
                                     n_rounds=len(sizes), dropout=self.dropout, n_passes=self.n_passes,
                                     n_hidden=self.n_hidden, epochs=self.epochs,
                                     on_round=(lambda r, pick: ctx.reveal(pick)) if ctx.can_reveal else None)
        return rounds


def start_batch(start: str, ctx, k: int) -> np.ndarray:
    """An image-only first batch of ``k`` unmeasured spots: ``'random'`` or ``'kmeans'``."""
    exclude = np.flatnonzero(ctx.measured)
    if start == "kmeans":
        return kmeans_select(ctx.embedding, k, ctx.rng, exclude=exclude)
    return random_select(ctx.n_obs, k, ctx.rng, exclude=exclude)
