"""Active sampling under a sequencing budget: SCRL (single-cell-guided RL) and baselines."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import SAMPLE_ROUND_OBS, SAMPLED_OBS, SPATIAL_KEY, TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._spatial import get_table, library_column
from .._utils import progress_bar
from .._validate import assert_key_in, check_matrix

METHODS = ("scrl", "random", "uncertainty", "diversity", "grid", "kmeans")
_NOT_IMAGE = {"X_pca", "X_umap", "X_tsne", "X_diffmap", "X_scvi", "X_draw_graph_fr", "X_spatial", "X_mde"}


def _round_key(key_added: str) -> str:
    return SAMPLE_ROUND_OBS if key_added == SAMPLED_OBS else f"{key_added}_round"


def _image_embedding(data: Any, table: AnnData, embedding_key: str | None) -> tuple[str, np.ndarray, bool]:
    """The image embedding: ``(key, array, computed_here)``."""
    if embedding_key is not None:
        assert_key_in(table.obsm, embedding_key, where="table.obsm",
                      hint="Compute image embeddings with si.pp.embed first.")
        return embedding_key, table.obsm[embedding_key], False
    cands = [k for k in table.obsm if k.startswith("X_") and k not in _NOT_IMAGE]
    if cands:
        return cands[0], table.obsm[cands[0]], False
    try:
        from ..pp import embed
    except ImportError:
        embed = None
    if embed is None:
        msg = (f"No image embedding in table.obsm (keys: {list(table.obsm)}). Run si.pp.embed(data) first, "
               "or pass embedding_key=.")
        raise KeyError(msg)
    logger.info("no image embedding found: computing one with si.pp.embed")
    emb = embed(data, inplace=False)
    return "X_efficientnet_lite0", np.asarray(emb), True


def _counts(table: AnnData, layer: str | None):
    if layer is not None:
        assert_key_in(table.layers, layer, where="table.layers")
        return table.layers[layer]
    return table.X


def _log1p_rows(x, idx: np.ndarray) -> np.ndarray:
    rows = x[idx]
    rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    return np.log1p(np.maximum(rows.astype(np.float32), 0))


def _resolve_budget(budget: float | int, n_total: int, n_free: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        msg = f"budget must be a fraction in (0, 1] or a number of spots, got {budget!r}."
        raise TypeError(msg)
    if not np.isfinite(budget) or budget <= 0:
        msg = f"budget must be positive (a fraction in (0, 1] or a spot count), got {budget!r}: the budget is empty."
        raise ValueError(msg)
    b = int(round(budget * n_total)) if isinstance(budget, (float, np.floating)) and budget <= 1.0 else int(budget)
    if isinstance(budget, (float, np.floating)) and budget > 1.0 and budget != int(budget):
        msg = f"budget {budget!r} > 1 must be a whole number of spots."
        raise ValueError(msg)
    if b < 1:
        msg = f"budget {budget!r} of {n_total} spots rounds to 0 spots: the budget is empty."
        raise ValueError(msg)
    if b > n_free:
        msg = f"budget of {b} spots exceeds the {n_free} spots available to sample."
        raise ValueError(msg)
    return b


def _weights(weights) -> Any:
    from ..models._sampling._rewards import RewardWeights

    if isinstance(weights, RewardWeights):
        return weights
    if isinstance(weights, Mapping):
        bad = set(weights) - {"sc", "type", "spa"}
        if bad:
            msg = f"Unknown reward weights {sorted(bad)}; use 'sc', 'type', 'spa'."
            raise ValueError(msg)
        return RewardWeights(**{k: float(v) for k, v in weights.items()})
    w = tuple(float(v) for v in weights)
    if len(w) != 3:
        msg = f"weights must be (w_sc, w_type, w_spa), got {weights!r}."
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

    def __init__(self, x, n_clusters: int, seed: int) -> None:
        self.x, self.n_clusters, self.seed = x, int(n_clusters), seed

    def __call__(self, idx: np.ndarray):
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        y = _log1p_rows(self.x, idx)
        v = y.var(0)
        y = y[:, np.argsort(-v)[: min(2000, y.shape[1])]]
        k = int(min(self.n_clusters, max(1, len(idx) // 3)))
        if len(idx) < 3 or k < 2:
            lab = np.zeros(len(idx), dtype=np.int64)
            return lab, lab
        nc = int(min(30, y.shape[1], len(idx) - 1))
        z = PCA(nc, random_state=self.seed).fit_transform(y - y.mean(0)) if nc >= 2 else y
        lab = KMeans(k, n_init=1, random_state=self.seed).fit_predict(z).astype(np.int64)
        return lab, lab


@d.dedent
def active_sample(
    data: Any,
    budget: float | int = 0.1,
    *,
    method: str = "scrl",
    mode: str = "simulate",
    embedding_key: str | None = None,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    layer: str | None = None,
    reference: AnnData | None = None,
    cell_type_key: str = "celltype_major",
    encoder: Any = "scvi",
    prior: Any = None,
    sampled_key: str | None = None,
    n_rounds: int = 20,
    n_rollouts: int = 8,
    weights: Mapping[str, float] | Sequence[float] | Any = (20.0, 5.0, 10.0),
    n_clusters: int = 30,
    lr: float = 1e-2,
    seed: int | None = None,
    progress: bool | None = None,
    key_added: str = SAMPLED_OBS,
    inplace: bool = True,
) -> pd.DataFrame | None:
    """Choose which spots to sequence under a budget: SCRL or a baseline.

    **SCRL** (SCR²-ST, single-cell-guided reinforcement learning): a policy
    ``π(e) = W2·ReLU(W1·e)`` on image embeddings draws ``k = budget / n_rounds`` unsampled spots
    per round (softmax, without replacement; the first round is random). Each round, candidate
    batches are scored by the gain in ``R = w_sc·R_sc + w_type·R_type + w_spa·R_spa``:

    - ``R_sc``: fraction of ``n_clusters`` cell-state centroids (MiniBatchKMeans on PCA-50 of
      the reference's scVI embeddings) hit by the sampled spots (spots embedded as scVI queries);
    - ``R_type``: normalised entropy of the sampled spots' nearest-cell types;
    - ``R_spa``: dispersion of the samples minus the mean distance from every spot to its
      nearest sample, both in units of the section's size (worse coverage is penalised).

    Expression is read only for spots already chosen; labels of candidates not yet revealed
    are estimated from their nearest revealed spot in image space. The policy is updated by
    REINFORCE on the log-probability of each candidate batch (running-mean baseline,
    normalised rewards) and the best candidate is taken. Without a reference, ``R_sc`` and
    ``R_type`` use k-means clusters of the revealed spots' own log1p expression.

    **Baselines**: ``'random'``; ``'uncertainty'`` (MC-dropout ``p = 0.1``, ``T = 20`` on an MLP
    trained on the revealed spots, over ``n_rounds`` rounds); ``'diversity'`` (PCA-128, DBSCAN,
    k-means fallback with ``≥ √N/5`` clusters, uniform per cluster); ``'grid'`` (a spatially
    uniform lattice per section); ``'kmeans'`` (the spot nearest each of ``budget`` k-means
    centroids of the image embedding).

    Parameters
    ----------
    %(data)s
    budget
        Fraction of the table's spots (``0 < budget ≤ 1``) or a number of spots. In propose
        mode, the number of *new* spots.
    method
        ``'scrl'``, ``'random'``, ``'uncertainty'``, ``'diversity'``, ``'grid'`` or ``'kmeans'``.
    mode
        ``'simulate'``: all expression is in the table but is read only once a spot is chosen
        (benchmarking). ``'propose'``: ``sampled_key`` marks spots already measured (their
        expression in ``X``/``layer``); the next batch is returned.
    embedding_key
        ``.obsm`` key of image embeddings (policy input). ``None``: the first ``X_*`` key that
        is not a known expression embedding, else computed with ``si.pp.embed``.
    %(table_key)s
    %(library_key)s
    spatial_key
        ``.obsm`` key of spot coordinates.
    layer
        Layer with raw counts; ``None`` uses ``X``.
    reference
        Single-cell reference AnnData with raw counts (e.g. :func:`stimg.datasets.her2st_sc_reference`).
    cell_type_key
        Column of ``reference.obs`` with cell types.
    encoder
        Gene encoder for spots and cells: ``'scvi'``, ``'pca'``, a
        :class:`~stimg.models.GeneEncoder` or a callable ``adata -> array``.
    prior
        A fitted :class:`~stimg.models.SingleCellPrior` (reused across calls instead of ``reference``).
    sampled_key
        Propose mode: boolean ``.obs`` column of spots already measured.
    n_rounds
        Rounds (SCRL and uncertainty; paper: 20).
    n_rollouts
        Candidate batches scored per SCRL round.
    weights
        ``(w_sc, w_type, w_spa)`` or a dict with keys ``'sc'``, ``'type'``, ``'spa'``. The paper's
        ``(20, 5, 0.05)`` used raw pixel distances; here distances are in tissue units, so the
        default ``w_spa = 10`` gives the spatial term a weight comparable to the others.
    n_clusters
        Cell-state clusters ``C``.
    lr
        Policy learning rate (Adam).
    seed
        Random seed (``None``: :attr:`stimg.settings.seed`).
    %(progress)s
    key_added
        ``.obs`` column for the sampled mask; rounds go to ``'si_sample_round'`` (or
        ``f'{key_added}_round'``) and parameters and per-round rewards to ``.uns[key_added]``.
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` a DataFrame indexed like ``.obs`` with the two columns (per-round
    rewards in ``.attrs['rounds']``); otherwise ``None`` and the table gets

    - ``.obs[key_added]``: bool, spot sampled (including, in propose mode, those measured before),
    - ``.obs['si_sample_round']``: int round of selection, ``-1`` for unsampled spots,
    - ``.uns[key_added]``: ``{'params': …, 'rounds': DataFrame}`` (per-round ``R_sc``, ``R_type``,
      ``R_spa``, total reward, gain; SCRL only for rewards).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(300, 20, image=False, as_anndata=True)
    >>> si.tl.active_sample(adata, 0.1, method="scrl", n_rounds=5)
    >>> int(adata.obs["si_sampled"].sum())
    30
    >>> si.tl.active_sample(adata, 0.1, method="grid", key_added="grid")  # a baseline
    """
    start = time.perf_counter()
    from .._settings import settings

    seed = settings.seed if seed is None else int(seed)
    if method not in METHODS:
        msg = f"Unknown method {method!r}; choose one of {METHODS}."
        raise ValueError(msg)
    if mode not in ("simulate", "propose"):
        msg = f"mode must be 'simulate' or 'propose', got {mode!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    n = table.n_obs
    if n == 0:
        msg = "The table has no spots."
        raise ValueError(msg)
    assert_key_in(table.obsm, spatial_key, where="table.obsm", hint="Spot coordinates are needed (read with si.io).")
    xy_raw = check_matrix(np.asarray(table.obsm[spatial_key])[:, :2], f"obsm[{spatial_key!r}]", n_obs=n)
    _, lib = library_column(table, library_key)
    groups = pd.Categorical(lib.to_numpy()).codes.astype(np.int64)
    x_counts = _counts(table, layer)
    # already measured spots (propose mode)
    measured = np.zeros(n, dtype=bool)
    if mode == "propose":
        if sampled_key is None:
            msg = "mode='propose' needs sampled_key=: a boolean .obs column marking spots already measured."
            raise ValueError(msg)
        assert_key_in(table.obs, sampled_key, where="table.obs")
        col = table.obs[sampled_key]
        if col.isna().any():
            msg = f"obs[{sampled_key!r}] has NaN; mark every spot True (measured) or False."
            raise ValueError(msg)
        measured = col.to_numpy().astype(bool)
        if not measured.any():
            msg = f"obs[{sampled_key!r}] marks no spot as measured; use mode='simulate' or sample a first batch."
            raise ValueError(msg)
        check_matrix(x_counts[np.flatnonzero(measured)], "expression of the measured spots")
    elif sampled_key is not None:
        msg = "sampled_key= is only used with mode='propose'."
        raise ValueError(msg)
    n_free = int((~measured).sum())
    b = _resolve_budget(budget, n, n_free)
    round_key = _round_key(key_added)
    emb_key, emb, computed = _image_embedding(data, table, embedding_key)
    emb = check_matrix(emb, f"obsm[{emb_key!r}]", n_obs=n)
    if method == "scrl" and mode == "simulate":
        check_matrix(x_counts, "expression (X or layer)" if layer is None else f"layers[{layer!r}]")

    from ..models._sampling import _baselines as bl
    from ..models._sampling._rewards import normalise_coordinates

    rng = np.random.default_rng(seed)
    xy = normalise_coordinates(xy_raw, groups)
    exclude = np.flatnonzero(measured)
    records: list[dict] = []
    prior_info: dict[str, Any] = {}
    if b == n_free:
        rounds = [np.flatnonzero(~measured)]
    elif method == "random":
        rounds = [bl.random_select(n, b, rng, exclude=exclude)]
    elif method == "grid":
        rounds = [bl.grid_select(xy, groups, b, rng, exclude=exclude)]
    elif method == "kmeans":
        rounds = [bl.kmeans_select(emb, b, rng, exclude=exclude)]
    elif method == "diversity":
        rounds = [bl.diversity_select(emb, b, rng, exclude=exclude)]
    elif method == "uncertainty":
        def targets(idx, x=x_counts):
            y = _log1p_rows(x, idx)
            return y[:, np.argsort(-y.var(0))[:300]] if y.shape[1] > 300 else y

        rounds = bl.uncertainty_select(emb, targets, b, rng, exclude=exclude,
                                       n_rounds=1 if mode == "propose" else n_rounds)
    else:
        rounds, records, prior_info = _scrl(table, emb, xy, groups, b, measured, x_counts, layer=layer, mode=mode,
                                            reference=reference, cell_type_key=cell_type_key, encoder=encoder,
                                            prior=prior, n_rounds=n_rounds, n_rollouts=n_rollouts,
                                            weights=weights, n_clusters=n_clusters, lr=lr, seed=seed,
                                            progress=progress)
    # assemble, check, then write
    sampled = measured.copy()
    rnd = np.full(n, -1, dtype=np.int64)
    if mode == "propose":
        prev = table.obs[round_key].to_numpy() if round_key in table.obs else None
        rnd[measured] = prev[measured].astype(np.int64) if prev is not None else 0
        offset = int(rnd[measured].max()) + 1
    else:
        offset = 0
    for r, idx in enumerate(rounds):
        if sampled[idx].any():
            msg = "internal error: a spot was selected twice."
            raise RuntimeError(msg)
        sampled[idx] = True
        rnd[idx] = (offset if mode == "propose" and method != "scrl" else offset + r)
    if mode == "propose" and method == "scrl":  # one user-facing batch
        rnd[sampled & ~measured] = offset
    n_new = int((sampled & ~measured).sum())
    if n_new != b:
        msg = f"internal error: selected {n_new} spots for a budget of {b}."
        raise RuntimeError(msg)
    out = pd.DataFrame({key_added: sampled, round_key: rnd}, index=table.obs_names)
    rounds_df = pd.DataFrame(records)
    out.attrs["rounds"] = rounds_df
    params = {"method": method, "mode": mode, "budget": b, "budget_arg": float(budget),
              "embedding_key": emb_key, "n_rounds": int(n_rounds), "seed": seed, "layer": layer,
              "library_key": library_key or "", "sampled_key": sampled_key or "", **prior_info}
    if method == "scrl":
        params.update({"n_rollouts": int(n_rollouts), "lr": float(lr), "n_clusters": int(n_clusters),
                       "weights": _weights(weights).as_dict()})
    logger.info("active_sample[%s/%s]: %d new spots (%d sampled of %d)", method, mode, n_new, int(sampled.sum()), n)
    if not inplace:
        return out
    if computed:
        table.obsm[emb_key] = emb.astype(np.float32)
        log_added("obsm", emb_key)
    table.obs[key_added] = sampled
    table.obs[round_key] = rnd
    table.uns[key_added] = {"params": params, "rounds": rounds_df}
    log_added("obs", key_added, start)
    log_added("obs", round_key)
    log_added("uns", key_added)
    return None


def _scrl(table, emb, xy, groups, b, measured, x_counts, *, layer, mode, reference, cell_type_key, encoder, prior,
          n_rounds, n_rollouts, weights, n_clusters, lr, seed, progress):
    from ..models._sampling._policy import SamplingPolicy
    from ..models._sampling._scrl import Labeler, _surrogate, run_scrl

    w = _weights(weights)
    if prior is None and reference is not None:
        from ..models._sc_prior import SingleCellPrior

        prior = SingleCellPrior(reference, cell_type_key, encoder=encoder, n_clusters=n_clusters, seed=seed)
        prior.fit(table.var_names)
    x_pol = _policy_input(emb, 64, seed)
    measured_idx = np.flatnonzero(measured)
    info: dict[str, Any] = {}
    if prior is not None:
        info.update({"reward_source": "single-cell reference", "n_centroids": prior.n_centroids,
                     "n_types": prior.n_types, "encoder": type(prior.encoder).__name__})
        n_cl, n_ty = prior.n_centroids, prior.n_types
        if mode == "simulate":
            cl_all, ty_all = prior.label(prior.embed(table, layer))

            def reveal(idx):
                return cl_all[idx], ty_all[idx]

            labeler = Labeler(reveal, n_cl, n_ty)
            init_labels = None
        else:
            sub = table[measured_idx]
            cl_m, ty_m = prior.label(prior.embed(sub, layer))
            init_labels = (cl_m, ty_m)
    else:
        logger.info("no single-cell reference: the biological reward uses k-means clusters of the sampled "
                    "spots' own expression (PCA of log1p counts)")
        info["reward_source"] = "own expression clusters"
        fb = _FallbackClusters(x_counts, n_clusters, seed)
        n_cl = n_ty = fb.n_clusters
        if mode == "simulate":
            labeler = Labeler(lambda idx: (None, None), n_cl, n_ty, recluster=fb)
            init_labels = None
        else:
            init_labels = fb(measured_idx)
    if mode == "propose":  # labels of new picks are estimates from the nearest measured spot
        feat = x_pol[:, :10]
        cl_m, ty_m = init_labels

        def reveal(idx):
            return (_surrogate(feat, measured_idx, cl_m, idx), _surrogate(feat, measured_idx, ty_m, idx))

        labeler = Labeler(reveal, n_cl, n_ty)
    policy = SamplingPolicy(x_pol.shape[1], 128, lr=lr, seed=seed)

    def iterate(it, total):
        return progress_bar(it, desc="SCRL rounds", total=total, progress=progress)

    from ..models._sampling._baselines import torch_threads

    with torch_threads(len(x_pol)):
        rounds, records = run_scrl(x_pol, xy, groups, b, labeler, policy=policy, n_rounds=n_rounds,
                                   n_rollouts=n_rollouts, weights=w,
                                   initial=measured_idx if mode == "propose" else None,
                                   initial_labels=init_labels, random_first=mode == "simulate", seed=seed,
                                   iterate=iterate)
    return rounds, records, info
