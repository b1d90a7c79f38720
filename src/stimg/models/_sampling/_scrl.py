"""The SCRL loop (SCR²-ST §2.2): policy rounds, rewards from revealed spots only, REINFORCE.

Each round after the random warm-up:

1. the policy draws ``n_rollouts`` candidate batches of ``k`` unsampled spots (Plackett–Luce);
2. each candidate is scored by the reward *gain* it would bring to the sample set: the spatial
   term exactly, the biological terms with labels of not-yet-revealed spots *estimated* from
   the nearest revealed spot in image-embedding space (no hidden expression is read);
3. REINFORCE on those candidates (running-mean baseline, normalised rewards) updates the policy;
4. the best candidate is committed, its expression revealed, and the true reward recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ._baselines import _round_sizes
from ._rewards import RewardState, RewardWeights


@dataclass
class Labeler:
    """Biological labels of revealed spots.

    ``reveal(idx)`` returns ``(clusters, types)`` for spots ``idx`` once measured (``None`` for a
    term that is off). ``recluster`` (optional) recomputes the labels of *all* revealed spots
    (used by the expression-only fallback, whose clusters change as spots are revealed).
    """

    reveal: Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray | None]]
    n_clusters: int
    n_types: int
    recluster: Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray | None]] | None = None


def _surrogate(feat: np.ndarray, revealed: np.ndarray, labels: np.ndarray | None, query: np.ndarray):
    if labels is None or len(revealed) == 0:
        return None
    _, nn = cKDTree(feat[revealed]).query(feat[query], k=1)
    return labels[nn]


def run_scrl(emb: np.ndarray, xy: np.ndarray, groups: np.ndarray, budget: int, labeler: Labeler, *,
             policy, n_rounds: int = 20, n_rollouts: int = 8, n_steps: int = 1,
             weights: RewardWeights | None = None, initial: np.ndarray | None = None,
             initial_labels: tuple[np.ndarray | None, np.ndarray | None] | None = None,
             random_first: bool = True, surrogate_dims: int = 10, seed: int = 0,
             iterate: Callable = lambda it, **kw: it):
    """Select ``budget`` spots in ``n_rounds`` rounds.

    Parameters
    ----------
    emb
        ``(n, d)`` standardised image embeddings (policy input).
    xy
        ``(n, 2)`` coordinates in tissue units.
    groups
        Integer section of each spot.
    budget
        Spots to add.
    labeler
        Reveals biological labels of chosen spots.
    policy
        A :class:`~stimg.models.SamplingPolicy`.
    initial, initial_labels
        Spots already sampled (propose mode) and their labels.
    random_first
        Draw the first round uniformly at random (when nothing is sampled yet).

    Returns
    -------
    ``(rounds, records)``: one index array per round and one reward record per round.
    """
    rng = np.random.default_rng(seed)
    n = len(emb)
    weights = weights or RewardWeights()
    state = RewardState(xy, groups, labeler.n_clusters, labeler.n_types, weights)
    cl = np.full(n, -1, dtype=np.int64)
    ty = np.full(n, -1, dtype=np.int64)
    feat = emb[:, : min(surrogate_dims, emb.shape[1])]
    if initial is not None and len(initial):
        c0, t0 = initial_labels if initial_labels is not None else (None, None)
        if c0 is not None:
            cl[initial] = c0
        if t0 is not None:
            ty[initial] = t0
        state.add(initial, c0, t0)
    sizes = _round_sizes(budget, n_rounds)
    rounds: list[np.ndarray] = []
    records: list[dict] = []
    for r in iterate(range(len(sizes)), total=len(sizes)):
        k = sizes[r]
        avail = ~state.sampled
        if avail.sum() == 0:
            break
        k = min(k, int(avail.sum()))
        revealed = np.flatnonzero(state.sampled)
        loss, mean_gain = float("nan"), float("nan")
        if r == 0 and random_first and len(revealed) == 0:
            pick = rng.choice(np.flatnonzero(avail), size=k, replace=False)
        else:
            scores = policy.scores(emb)
            scores = np.where(avail, scores, -np.inf)
            tree = cKDTree(feat[revealed]) if len(revealed) else None
            draws, gains = [], []
            for _ in range(n_rollouts):
                key = scores + rng.gumbel(size=n)
                d = np.argpartition(-key, k - 1)[:k]
                d = d[np.argsort(-key[d])]
                c = t = None
                if tree is not None:  # labels of unrevealed candidates: nearest revealed spot in image space
                    nn = revealed[tree.query(feat[d], k=1)[1]]
                    c = cl[nn] if labeler.n_clusters else None
                    t = ty[nn] if labeler.n_types else None
                draws.append(d)
                gains.append(state.gain(d, c, t))
            gains = np.asarray(gains)
            loss = policy.reinforce(emb, avail, draws, gains, n_steps=n_steps)
            pick = draws[int(np.argmax(gains))]
            mean_gain = float(gains.mean())
        c_new, t_new = labeler.reveal(pick)
        if c_new is not None:
            cl[pick] = c_new
        if t_new is not None:
            ty[pick] = t_new
        before = state.current()["total"]
        state.add(pick, c_new, t_new)
        if labeler.recluster is not None:
            idx = np.flatnonzero(state.sampled)
            c_all, t_all = labeler.recluster(idx)
            if c_all is not None:
                cl[idx] = c_all
            if t_all is not None:
                ty[idx] = t_all
            state.relabel(cl[idx] if c_all is not None else None, ty[idx] if t_all is not None else None)
        now = state.current()
        rounds.append(np.asarray(pick, dtype=np.int64))
        records.append({"round": r, "n_new": len(pick), "n_sampled": int(state.sampled.sum()),
                        "reward": now["total"], "R_sc": now["sc"], "R_type": now["type"], "R_spa": now["spa"],
                        "gain": now["total"] - before, "mean_rollout_gain": mean_gain, "loss": loss})
    return rounds, records
