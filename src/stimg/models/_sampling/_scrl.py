"""SCRL (SCR²-ST §2.2): a policy on image embeddings, rewards from revealed spots only, REINFORCE.

Each round after the start batch:

1. the policy draws ``n_rollouts`` candidate batches of ``k`` unsampled spots (Plackett–Luce);
2. each candidate is scored by the reward *gain* it would bring to the sample set: the spatial and
   image-coverage terms exactly, the biological terms with labels of not-yet-revealed spots
   *estimated* from the nearest revealed spot in image-embedding space (no hidden expression is
   read), plus an optional bonus for the model's MC-dropout uncertainty at the candidates;
3. REINFORCE on those candidates updates the policy;
4. the best candidate is committed; in simulate mode its expression is revealed and the true
   reward recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ._baselines import _round_sizes, _standardise_pca, check_count, start_batch, torch_threads
from ._rewards import RewardState, RewardWeights, cover_distance, nearest_distance


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


class _StateFeatures:
    """Per spot: distance to the nearest sampled spot in image space and in the tissue, each / its mean.

    Updated incrementally as spots are committed (no recomputation over the whole sampled set).
    """

    def __init__(self, feat: np.ndarray, xy: np.ndarray) -> None:
        self.feat, self.xy = feat, xy
        self.d_img = np.full(len(feat), np.inf)
        self.d_xy = np.full(len(feat), np.inf)

    def add(self, idx: np.ndarray) -> None:
        if len(idx):
            self.d_img = np.minimum(self.d_img, nearest_distance(self.feat, self.feat[idx]))
            self.d_xy = np.minimum(self.d_xy, cover_distance(self.xy, self.xy[idx]))

    def __call__(self) -> np.ndarray:
        if not np.isfinite(self.d_img).any():
            return np.ones((len(self.feat), 2), dtype=np.float32)
        out = np.c_[self.d_img / max(self.d_img.mean(), 1e-12), self.d_xy / max(self.d_xy.mean(), 1e-12)]
        return out.astype(np.float32)


def run_scrl(emb: np.ndarray, xy: np.ndarray, groups: np.ndarray, budget: int, labeler: Labeler, *,
             policy, n_rounds: int = 20, n_rollouts: int = 8, n_steps: int = 1,
             weights: RewardWeights | None = None, initial: np.ndarray | None = None,
             initial_labels: tuple[np.ndarray | None, np.ndarray | None] | None = None,
             start: Callable[[int], np.ndarray] | None = None, feat: np.ndarray | None = None,
             state_features: bool = False, baseline: str = "running",
             uncertainty: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
             surrogate_dims: int = 10, seed: int = 0, iterate: Callable = lambda it, **kw: it):
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
        A :class:`~stimg.models.SamplingPolicy` (input width ``d``, or ``d + 2`` with ``state_features``).
    initial, initial_labels
        Spots already sampled (propose mode) and their labels.
    start
        ``start(k) -> indices``: the first round's batch when nothing is sampled yet (``None``: the policy).
    feat
        ``(n, d')`` image features of the image-coverage reward and the state features.
    state_features
        Append, per spot, its distance to the nearest sampled spot in image space and in the tissue
        (and, with the uncertainty reward on, its relative uncertainty) to the policy input: the
        policy sees the sampled set. The policy's input width is ``d + 2`` (``d + 3``).
    baseline
        REINFORCE baseline (:meth:`SamplingPolicy.reinforce`).
    uncertainty
        ``uncertainty(revealed, free) -> scores``: model uncertainty of ``free`` spots from the revealed
        ones, for the ``weights.unc`` bonus (mean over a candidate, relative to the mean over ``free``).

    Returns
    -------
    ``(rounds, records)``: one index array per round and one reward record per round.
    """
    rng = np.random.default_rng(seed)
    n = len(emb)
    weights = weights or RewardWeights()
    state = RewardState(xy, groups, labeler.n_clusters, labeler.n_types, weights,
                        feat=feat if weights.img > 0 else None)
    cl = np.full(n, -1, dtype=np.int64)
    ty = np.full(n, -1, dtype=np.int64)
    sur = emb[:, : min(surrogate_dims, emb.shape[1])]
    st = _StateFeatures(feat, xy) if state_features else None
    use_unc = uncertainty is not None and weights.unc > 0
    if initial is not None and len(initial):
        c0, t0 = initial_labels if initial_labels is not None else (None, None)
        if c0 is not None:
            cl[initial] = c0
        if t0 is not None:
            ty[initial] = t0
        state.add(initial, c0, t0)
        if st is not None:
            st.add(initial)
    sizes = _round_sizes(budget, n_rounds)
    rounds: list[np.ndarray] = []
    records: list[dict] = []
    for r in iterate(range(len(sizes)), total=len(sizes)):
        avail = ~state.sampled
        if avail.sum() == 0:
            break
        k = min(sizes[r], int(avail.sum()))
        revealed = np.flatnonzero(state.sampled)
        loss, mean_gain, r_unc = float("nan"), float("nan"), float("nan")
        if len(revealed) == 0 and start is not None:
            pick = np.asarray(start(k), dtype=np.int64)
        else:
            unc = None
            if use_unc and len(revealed) >= 2:
                free = np.flatnonzero(avail)
                u = np.zeros(n)
                u[free] = uncertainty(revealed, free)
                unc = u / max(u[free].mean(), 1e-12)
            inp = emb
            if st is not None:  # the policy sees the sampled set (and the model's uncertainty)
                inp = np.c_[emb, st()] if not use_unc else np.c_[emb, st(), np.ones(n) if unc is None else unc]
                inp = inp.astype(np.float32)
            raw = policy.scores(inp)
            scores = np.where(avail, raw, -np.inf)
            tree = cKDTree(sur[revealed]) if len(revealed) else None
            draws, gains = [], []
            for _ in range(n_rollouts):
                key = scores + rng.gumbel(size=n)
                d = np.argpartition(-key, k - 1)[:k]
                draws.append(d[np.argsort(-key[d])])
            nn_of = None
            if tree is not None:  # labels of unrevealed candidates: nearest revealed spot in image space
                cand, inv = np.unique(np.concatenate(draws), return_inverse=True)  # one query per round
                nn = revealed[tree.query(sur[cand], k=1, workers=-1)[1]][inv]
                nn_of = np.split(nn, np.cumsum([len(d) for d in draws])[:-1])
            for j, d in enumerate(draws):
                c = t = None
                if nn_of is not None:
                    c = cl[nn_of[j]] if labeler.n_clusters else None
                    t = ty[nn_of[j]] if labeler.n_types else None
                g = state.gain(d, c, t)
                if unc is not None:
                    g += weights.unc * float(unc[d].mean())
                gains.append(g)
            gains = np.asarray(gains)
            loss = policy.reinforce(inp, avail, draws, gains, n_steps=n_steps, baseline=baseline, scores=raw)
            best = int(np.argmax(gains))
            pick = draws[best]
            mean_gain = float(gains.mean())
            if unc is not None:
                r_unc = float(unc[pick].mean())
        c_new, t_new = labeler.reveal(pick)
        if c_new is not None:
            cl[pick] = c_new
        if t_new is not None:
            ty[pick] = t_new
        before = state.current()["total"]
        state.add(pick, c_new, t_new)
        if st is not None:
            st.add(pick)
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
                        "R_img": now["img"], "R_unc": r_unc, "gain": now["total"] - before,
                        "mean_rollout_gain": mean_gain, "loss": loss})
    return rounds, records


# ----------------------------------------------------------------------------- the sampler
def _weights(weights: Any) -> RewardWeights:
    if isinstance(weights, RewardWeights):
        return weights
    names = ("sc", "type", "spa", "img", "unc")
    if isinstance(weights, Mapping):
        bad = set(weights) - set(names)
        if bad:
            msg = f"Unknown reward weights {sorted(bad)}; use {list(names)}."
            raise ValueError(msg)
        return RewardWeights(**{k: float(v) for k, v in weights.items()})
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        msg = f"weights must be a RewardWeights, a dict or a tuple (w_sc, w_type, w_spa[, w_img, w_unc]), got {weights!r}."
        raise TypeError(msg)
    w = tuple(float(v) for v in weights)
    if len(w) not in (3, 4, 5):
        msg = f"weights must be (w_sc, w_type, w_spa[, w_img[, w_unc]]), got {weights!r}."
        raise ValueError(msg)
    return RewardWeights(*w)


def _policy_input(emb: np.ndarray, n_comps: int, seed: int) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float32)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    if x.shape[1] > n_comps and x.shape[0] > n_comps:
        from sklearn.decomposition import PCA

        x = PCA(n_comps, random_state=seed, svd_solver="randomized").fit_transform(x)
        x = x / np.maximum(x.std(0), 1e-6)
    return np.ascontiguousarray(x, dtype=np.float32)


class _FallbackClusters:
    """Biological labels without a reference: k-means on PCA of log1p expression of revealed spots."""

    def __init__(self, expression: Callable[[np.ndarray], np.ndarray], n_clusters: int, seed: int) -> None:
        self.expression, self.n_clusters, self.seed = expression, int(n_clusters), seed

    def __call__(self, idx: np.ndarray):
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        k = int(min(self.n_clusters, max(1, len(idx) // 3)))
        if len(idx) < 3 or k < 2:
            lab = np.zeros(len(idx), dtype=np.int64)
            return lab, lab
        y = np.log1p(self.expression(idx))
        y = y[:, np.argsort(-y.var(0))[: min(2000, y.shape[1])]]
        nc = int(min(30, y.shape[1], len(idx) - 1))
        z = PCA(nc, random_state=self.seed).fit_transform(y - y.mean(0)) if nc >= 2 else y
        lab = KMeans(k, n_init=1, random_state=self.seed).fit_predict(z).astype(np.int64)
        return lab, lab


class SCRLSampler:
    """SCRL (SCR²-ST): single-cell-guided reinforcement learning over image embeddings.

    A policy ``π(e) = W2·ReLU(W1·e)`` on the spots' image embeddings (PCA-``n_comps``) draws
    ``k = budget / n_rounds`` unsampled spots per round (softmax, without replacement); the first
    round is the ``start`` batch. Each round ``n_rollouts`` candidate batches are scored by the gain
    in ``R = w_sc·R_sc + w_type·R_type + w_spa·R_spa + w_img·R_img`` (+ ``w_unc·R_unc``):

    - ``R_sc``: fraction of ``n_clusters`` cell-state centroids (MiniBatchKMeans on PCA-50 of the
      reference's scVI embeddings) hit by the sampled spots (spots embedded as scVI queries);
    - ``R_type``: normalised entropy of the sampled spots' nearest-cell types;
    - ``R_spa``: dispersion of the samples minus the mean distance from every spot to its nearest
      sample, both in units of the section's size (worse coverage is penalised);
    - ``R_img``: coverage of image-feature space (standardised PCA-50 of the embedding; see
      :func:`~stimg.models._sampling._rewards.image_coverage_reward`) — not in SCR²-ST;
    - ``R_unc``: mean MC-dropout uncertainty (10 passes, relative to the mean over unsampled spots)
      of an MLP trained on the revealed spots' 50 most variable genes — not in SCR²-ST.

    Expression is read only for spots already chosen; labels of candidates not yet revealed are
    estimated from their nearest revealed spot in image space. The policy is updated by REINFORCE
    on the log-probability of each candidate batch and the best candidate is committed. Without a
    reference, ``R_sc`` and ``R_type`` use k-means clusters of the revealed spots' own log1p
    expression. In propose mode (one batch, nothing revealed during the call) the labels of the
    proposed spots are estimated from the measured spots; with nothing measured yet, the first
    internal round is the ``start`` batch and the rest is planned on the label-free terms.

    Parameters
    ----------
    reference
        Single-cell reference AnnData with raw counts (e.g. :func:`stimg.datasets.her2st_sc_reference`).
    cell_type_key
        Column of ``reference.obs`` with cell types.
    encoder
        Gene encoder for spots and cells: ``'scvi'``, ``'pca'``, a :class:`~stimg.models.GeneEncoder`
        or a callable ``adata -> array``.
    prior
        A fitted :class:`~stimg.models.SingleCellPrior` (reused instead of fitting one on ``reference``).
    n_clusters
        Cell-state clusters ``C``.
    weights
        ``(w_sc, w_type, w_spa[, w_img[, w_unc]])``, a dict with those keys or a
        :class:`~stimg.models.RewardWeights`; ``None``: ``RewardWeights()``. The paper's ``(20, 5, 0.05)`` used raw pixel
        distances; here distances are in tissue units.
    n_rounds
        Rounds (paper: 20).
    n_rollouts
        Candidate batches scored per round.
    lr
        Policy learning rate (Adam).
    start
        First batch when nothing is measured: ``'random'`` (paper) or ``'kmeans'`` (image k-means).
    state
        The policy also sees the sampled set: each spot's distance to its nearest sampled spot in image
        space and in the tissue, and its relative uncertainty when ``w_unc > 0`` (not in SCR²-ST).
    baseline
        REINFORCE baseline: ``'running'`` (running mean of rewards) or ``'rloo'`` (leave-one-out over
        the round's rollouts).
    n_comps
        PCA components of the policy input.

    Examples
    --------
    >>> import stimg as si
    >>> adata, ref = si.datasets.synthetic(300, 30, image=False, reference=True, as_anndata=True)
    >>> si.tl.active_sample(adata, 0.1, method="scrl", reference=ref, cell_type_key="cell_type",
    ...                     encoder="pca", n_rounds=5)
    >>> adata.uns["si_sampled"]["rounds"].shape[0]
    5
    """

    def __init__(self, *, reference: Any = None, cell_type_key: str = "celltype_major", encoder: Any = "scvi",
                 prior: Any = None, n_clusters: int = 30, weights: Any = None, n_rounds: int = 20,
                 n_rollouts: int = 8, lr: float = 1e-2, start: str = "random", state: bool = False,
                 baseline: str = "running", n_comps: int = 64) -> None:
        self.n_rounds = check_count(n_rounds, "n_rounds")
        self.n_rollouts = check_count(n_rollouts, "n_rollouts")
        self.n_clusters = check_count(n_clusters, "n_clusters", low=2)
        self.n_comps = check_count(n_comps, "n_comps")
        if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
            msg = f"lr must be a positive number, got {lr!r}."
            raise ValueError(msg)
        if start not in ("random", "kmeans"):
            msg = f"start must be 'random' or 'kmeans', got {start!r}."
            raise ValueError(msg)
        if baseline not in ("running", "rloo"):
            msg = f"baseline must be 'running' or 'rloo', got {baseline!r}."
            raise ValueError(msg)
        if reference is not None and prior is not None:
            msg = "Pass either reference= (a prior is fitted on it) or a fitted prior=, not both."
            raise ValueError(msg)
        self.weights = RewardWeights() if weights is None else _weights(weights)
        self.reference, self.cell_type_key, self.encoder, self.prior = reference, cell_type_key, encoder, prior
        self.lr, self.start, self.state, self.baseline = float(lr), start, bool(state), baseline
        if reference is not None:  # check now, fit on first use
            from .._sc_prior import SingleCellPrior

            self.prior = SingleCellPrior(reference, cell_type_key, encoder=encoder, n_clusters=self.n_clusters)
            self._fitted_genes = None
        else:
            self._fitted_genes = "given"

    def params(self) -> dict[str, Any]:
        return {"n_rounds": self.n_rounds, "n_rollouts": self.n_rollouts, "lr": self.lr,
                "n_clusters": self.n_clusters, "weights": self.weights.as_dict(), "start": self.start,
                "state": self.state, "baseline": self.baseline, "n_comps": self.n_comps}

    def _prior(self, var_names) -> Any:
        if self.prior is not None and self._fitted_genes is None:
            self.prior.fit(var_names)
            self._fitted_genes = "fitted"
        return self.prior

    def select(self, ctx) -> list[np.ndarray]:
        from anndata import AnnData

        from ._policy import SamplingPolicy

        w = self.weights
        x_pol = _policy_input(ctx.embedding, self.n_comps, ctx.seed)
        feat = (_standardise_pca(ctx.embedding, 50, ctx.seed).astype(np.float64)
                if (w.img > 0 or self.state) else None)
        measured = np.flatnonzero(ctx.measured)
        prior = self._prior(ctx.var_names)
        simulate = ctx.can_reveal
        if prior is not None:
            import pandas as pd

            ctx.info.update({"reward_source": "single-cell reference", "n_centroids": prior.n_centroids,
                             "n_types": prior.n_types, "encoder": type(prior.encoder).__name__})
            var = pd.DataFrame(index=pd.Index(ctx.var_names).astype(str))

            def labels(idx):
                if len(idx) == 0:
                    return np.zeros(0, np.int64), np.zeros(0, np.int64)
                return prior.label(prior.embed(AnnData(X=ctx.expression(idx), var=var)))

            n_cl, n_ty, recluster = prior.n_centroids, prior.n_types, None
            init = labels(measured)
        else:
            from ..._logging import logger

            logger.info("no single-cell reference: the biological reward uses k-means clusters of the sampled "
                        "spots' own expression (PCA of log1p counts)")
            ctx.info["reward_source"] = "own expression clusters"
            fb = _FallbackClusters(ctx.expression, self.n_clusters, ctx.seed)
            labels, n_cl, n_ty = fb, fb.n_clusters, fb.n_clusters
            recluster = fb if simulate else None
            init = fb(measured)
        if simulate:
            def reveal(idx):
                ctx.reveal(idx)
                return labels(idx) if recluster is None else (None, None)
        else:  # propose: nothing is revealed; labels of the proposal are estimates from the measured spots
            sur = x_pol[:, :10]

            def reveal(idx):
                return _surrogate(sur, measured, init[0], idx), _surrogate(sur, measured, init[1], idx)

        labeler = Labeler(reveal, n_cl, n_ty, recluster=recluster)
        uncertainty = None
        if w.unc > 0:
            import torch

            from ._baselines import mc_dropout_variance

            xt = torch.as_tensor(x_pol)

            def uncertainty(revealed, free):
                known = revealed[ctx.known[revealed]]
                y = np.log1p(ctx.expression(known))
                y = y[:, np.argsort(-y.var(0))[:50]]  # the 50 most variable genes of the revealed spots
                with torch.random.fork_rng():  # own stream: independent of other torch users (e.g. scVI)
                    torch.manual_seed(ctx.seed * 100_003 + len(known))
                    return mc_dropout_variance(xt, known, y, free, n_passes=10, epochs=100)

        n_state = (3 if w.unc > 0 else 2) if self.state else 0
        policy = SamplingPolicy(x_pol.shape[1] + n_state, 128, lr=self.lr, seed=ctx.seed)

        def iterate(it, total):
            from ..._utils import progress_bar

            return progress_bar(it, desc="SCRL rounds", total=total, progress=ctx.progress)

        with torch_threads(ctx.n_obs):
            rounds, records = run_scrl(
                x_pol, ctx.coordinates, ctx.groups, ctx.budget, labeler, policy=policy, n_rounds=self.n_rounds,
                n_rollouts=self.n_rollouts, weights=w, initial=measured, initial_labels=init,
                start=lambda k: start_batch(self.start, ctx, k), feat=feat, state_features=self.state,
                baseline=self.baseline, uncertainty=uncertainty, seed=ctx.seed, iterate=iterate)
        for rec in records:
            ctx.record(**rec)
        return rounds
