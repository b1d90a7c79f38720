"""Active sampling under a sequencing budget: run any sampler plug-in (SCRL, baselines, your own)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import SAMPLE_ROUND_OBS, SAMPLED_OBS, SPATIAL_KEY, TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._spatial import get_table, library_column
from .._validate import assert_key_in, check_matrix

#: ``method`` of :func:`active_sample` when none is given: the sampler that won on held-out
#: sections and patients in ``benchmarks/her2st_sampling.py`` (``benchmarks/results/her2st_sampling.md``).
DEFAULT_METHOD = "kmeans"
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
    from ..pp import embed

    logger.info("no image embedding found: computing one with si.pp.embed")
    try:
        emb = embed(data, inplace=False)
    except (KeyError, ValueError, TypeError) as e:
        msg = (f"No image embedding in table.obsm (keys: {list(table.obsm)}) and computing one with si.pp.embed "
               f"failed: {e} Run si.pp.embed(data) on data with an image, or pass embedding_key=.")
        raise KeyError(msg) from None
    return "X_efficientnet_lite0", np.asarray(emb), True


def _counts(table: AnnData, layer: str | None):
    if layer is not None:
        assert_key_in(table.layers, layer, where="table.layers")
        return table.layers[layer]
    return table.X


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


def _measured(table: AnnData, mode: str, sampled_key: str | None) -> np.ndarray:
    n = table.n_obs
    if mode == "simulate":
        if sampled_key is not None:
            msg = "sampled_key= is only used with mode='propose' (spots measured in earlier rounds)."
            raise ValueError(msg)
        return np.zeros(n, dtype=bool)
    if sampled_key is None:
        logger.info("propose: no spot measured yet (sampled_key=None), proposing an image-only first batch")
        return np.zeros(n, dtype=bool)
    assert_key_in(table.obs, sampled_key, where="table.obs",
                  hint="Pass the boolean column marking spots measured so far (e.g. 'si_sampled'), or None.")
    col = table.obs[sampled_key]
    if col.isna().any():
        msg = f"obs[{sampled_key!r}] has missing values; mark every spot True (measured) or False."
        raise ValueError(msg)
    vals = col.to_numpy()
    if vals.dtype != bool and not np.isin(vals, [0, 1]).all():
        msg = f"obs[{sampled_key!r}] must be boolean (measured or not), got values such as {vals[:3].tolist()}."
        raise TypeError(msg)
    return vals.astype(bool)


def _check_selection(rounds: Any, n: int, measured: np.ndarray, b: int, label: str) -> list[np.ndarray]:
    if not isinstance(rounds, (list, tuple)) or all(np.ndim(r) == 0 for r in rounds):
        rounds = [rounds]  # one array (or a list of indices): one round
    out = []
    for r in rounds:
        arr = np.asarray(r)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            msg = f"Sampler {label} returned {arr.dtype} values; return integer spot indices (positions)."
            raise TypeError(msg)
        out.append(arr.astype(np.int64).ravel())
    allidx = np.concatenate(out) if out else np.zeros(0, np.int64)
    if allidx.size and (allidx.min() < 0 or allidx.max() >= n):
        msg = f"Sampler {label} returned indices outside [0, {n}); return positions of the table's spots."
        raise ValueError(msg)
    if np.unique(allidx).size != allidx.size:
        msg = f"Sampler {label} returned some spots more than once; return distinct spots."
        raise ValueError(msg)
    if measured[allidx].any():
        msg = f"Sampler {label} returned {int(measured[allidx].sum())} spot(s) already measured; choose from ctx.free."
        raise ValueError(msg)
    if allidx.size != b:
        msg = f"Sampler {label} returned {allidx.size} spots for a budget of {b}; return exactly ctx.budget spots."
        raise ValueError(msg)
    return out


@d.dedent
def active_sample(
    data: Any,
    budget: float | int = 0.1,
    *,
    method: Any = DEFAULT_METHOD,
    mode: str = "simulate",
    embedding_key: str | None = None,
    table_key: str = TABLE_KEY,
    library_key: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    layer: str | None = None,
    sampled_key: str | None = None,
    seed: int | None = None,
    progress: bool | None = None,
    key_added: str = SAMPLED_OBS,
    inplace: bool = True,
    **method_kwargs: Any,
) -> pd.DataFrame | None:
    """Choose which spots to sequence under a budget, with any sampler.

    ``method`` names a registered sampler (:func:`stimg.tl.list_samplers`; add your own with
    :func:`stimg.tl.register_sampler`) or is a sampler object or function. Extra keyword arguments
    are the sampler's own options. Built in:

    - ``'kmeans'`` (default): the spot nearest each of ``budget`` k-means centroids of the
      standardised image embedding (PCA-50), among spots not yet measured;
    - ``'scrl'``: SCR²-ST's single-cell-guided reinforcement learning
      (:class:`~stimg.models.SCRLSampler`; options ``reference``, ``prior``, ``weights``,
      ``n_rounds``, ``n_rollouts``, ``lr``, ``start``, ``state``, ...);
    - ``'uncertainty'``: MC-dropout uncertainty of an MLP trained on the revealed spots, over rounds;
    - ``'diversity'``: PCA-128, DBSCAN (k-means fallback), uniform per cluster;
    - ``'grid'``: a spatially uniform lattice per section (coordinates only);
    - ``'random'``.

    **Why k-means is the default.** On HER2ST (``benchmarks/her2st_sampling.py``; the five
    held-out sections of patient C and, across patients, C2–C6 → A1; top-50 HVGs; ridge and
    NB-ensemble models trained on the chosen spots only; ``benchmarks/results/her2st_sampling.md``)
    k-means and ``'uncertainty'`` tie for the best held-out PCC at budgets of 10 and 25 percent
    (mean over both fold groups, models and budgets: 0.149 and 0.151; on the other patient alone
    0.058 each), k-means leads on the other patient at 10 percent (ridge 0.051 vs 0.048, NB 0.063
    vs 0.058), needs only the image and is about 100 times faster. SCRL with its defaults (0.145)
    and random (0.141) trail.

    **Cost.** k-means with ``budget`` clusters would grow with spots × budget; above 2·10⁸ (spots
    × budget, e.g. a 10 percent budget of 100k spots) it runs in two levels — about √budget coarse
    clusters, then each one's share of the budget — so the cost grows with spots × √budget:
    2.7 s for a 10 percent budget of 100k spots and 42 s for one of a million spots on 2 idle cores
    (synthetic spots, 50-d embedding; flat k-means did not finish in 8 min at a million). Two-level picks cover image space as flat k-means
    does (mean distance of every spot to its nearest pick within 1 percent in the test suite).

    **Modes.** ``'simulate'`` (benchmarking): every spot's expression is in the table but a sampler
    reads it only for spots it has chosen. ``'propose'`` (a lab's workflow): ``sampled_key`` marks
    the spots measured so far (their raw counts in ``X``/``layer``; other spots' values are never
    read); the next batch is proposed. With nothing measured yet (``sampled_key=None``), round 0 is
    an image-only first batch. Each call is one lab round: ``.obs['si_sample_round']`` records it.

    Parameters
    ----------
    %(data)s
    budget
        Fraction of the table's spots (``0 < budget ≤ 1``) or a number of spots; the number of
        *new* spots in propose mode.
    method
        Sampler name, sampler object (with ``select(ctx)``) or function ``f(ctx) -> indices``.
    mode
        ``'simulate'`` or ``'propose'``.
    embedding_key
        ``.obsm`` key of image embeddings. ``None``: the first ``X_*`` key that is not a known
        expression embedding, else computed with ``si.pp.embed`` — only if the sampler uses it
        (``'random'`` and ``'grid'`` do not).
    %(table_key)s
    %(library_key)s
    spatial_key
        ``.obsm`` key of spot coordinates.
    layer
        Layer with raw counts; ``None`` uses ``X``.
    sampled_key
        Propose mode: boolean ``.obs`` column of spots already measured (``None``: none yet).
    seed
        Random seed (``None``: :attr:`stimg.settings.seed`).
    %(progress)s
    key_added
        ``.obs`` column for the sampled mask; rounds go to ``'si_sample_round'`` (or
        ``f'{key_added}_round'``), parameters and per-round records to ``.uns[key_added]``.
    %(inplace)s
    **method_kwargs
        Options of the sampler (e.g. ``reference=``, ``n_rounds=`` for ``'scrl'``).

    Returns
    -------
    With ``inplace=False`` a DataFrame indexed like ``.obs`` with the two columns (per-round records
    in ``.attrs['rounds']``); otherwise ``None`` and the table gets

    - ``.obs[key_added]``: bool, spot sampled (including, in propose mode, those measured before),
    - ``.obs['si_sample_round']``: int round (simulate: the sampler's internal round; propose: the
      lab round of each call), ``-1`` for unsampled spots,
    - ``.uns[key_added]``: ``{'params': …, 'rounds': DataFrame, 'history': DataFrame}`` (per-round
      rewards for SCRL; one history row per call, appended across propose rounds).

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(300, 20, image=False, as_anndata=True)
    >>> si.tl.active_sample(adata, 0.1, method="scrl", n_rounds=5)
    >>> int(adata.obs["si_sampled"].sum())
    30
    >>> si.tl.active_sample(adata, 0.1, method="grid", key_added="grid")  # a baseline

    A lab's rounds: propose from the image alone, sequence, propose again.

    >>> si.tl.active_sample(adata, 20, method="kmeans", mode="propose", key_added="plan")
    >>> # ... sequence the spots of obs["plan"], put their counts in X ...
    >>> si.tl.active_sample(adata, 20, method="kmeans", mode="propose", sampled_key="plan", key_added="plan")
    >>> int(adata.obs["plan_round"].max())
    1
    """
    start = time.perf_counter()
    from .._settings import settings
    from ..models._sampling._base import SamplingContext, make_sampler, sampler_params
    from ..models._sampling._rewards import normalise_coordinates

    seed = settings.seed if seed is None else int(seed)
    if mode not in ("simulate", "propose"):
        msg = f"mode must be 'simulate' or 'propose', got {mode!r}."
        raise ValueError(msg)
    sampler = make_sampler(method, method_kwargs)
    label = repr(method) if isinstance(method, str) else type(sampler).__name__
    table = get_table(data, table_key)
    n = table.n_obs
    if n == 0:
        msg = "The table has no spots (n_obs == 0); check the filtering that produced it."
        raise ValueError(msg)
    assert_key_in(table.obsm, spatial_key, where="table.obsm", hint="Spot coordinates are needed (read with si.io).")
    xy_raw = check_matrix(np.asarray(table.obsm[spatial_key])[:, :2], f"obsm[{spatial_key!r}]", n_obs=n)
    _, lib = library_column(table, library_key)
    cats = pd.Categorical(lib.astype(str).to_numpy())
    groups = cats.codes.astype(np.int64)
    x_counts = _counts(table, layer)
    measured = _measured(table, mode, sampled_key)
    n_free = int((~measured).sum())
    b = _resolve_budget(budget, n, n_free)
    round_key = _round_key(key_added)
    if embedding_key is not None:  # named explicitly: check it now
        assert_key_in(table.obsm, embedding_key, where="table.obsm", hint="Compute image embeddings with si.pp.embed.")
    computed: dict[str, np.ndarray] = {}

    def get_embedding() -> tuple[str, np.ndarray]:
        key, emb, was_computed = _image_embedding(data, table, embedding_key)
        emb = check_matrix(emb, f"obsm[{key!r}]", n_obs=n)
        if was_computed:
            computed[key] = emb
        return key, emb

    ctx = SamplingContext(n_obs=n, budget=b, rng=np.random.default_rng(seed), seed=seed, mode=mode,
                          measured=measured, coordinates=normalise_coordinates(xy_raw, groups), groups=groups,
                          sections=[str(c) for c in cats.categories], var_names=table.var_names, progress=progress,
                          _embedding=get_embedding, _counts=x_counts)
    if b == n_free:
        rounds = [np.flatnonzero(~measured)]
    else:
        rounds = _check_selection(sampler.select(ctx), n, measured, b, label)
    # assemble, then write
    sampled = measured.copy()
    rnd = np.full(n, -1, dtype=np.int64)
    if mode == "propose":
        prev = (pd.to_numeric(table.obs[round_key], errors="coerce").fillna(-1).to_numpy(np.int64)
                if round_key in table.obs else np.full(n, -1, np.int64))
        rnd[measured] = np.maximum(prev[measured], 0)
        lab_round = int(rnd[measured].max()) + 1 if measured.any() else 0
        for idx in rounds:
            rnd[idx] = lab_round
            sampled[idx] = True
    else:
        lab_round = 0
        for r, idx in enumerate(rounds):
            rnd[idx] = r
            sampled[idx] = True
    out = pd.DataFrame({key_added: sampled, round_key: rnd}, index=table.obs_names)
    rounds_df = pd.DataFrame(ctx.records)
    out.attrs["rounds"] = rounds_df
    method_name = method if isinstance(method, str) else type(sampler).__name__
    params = {"method": method_name, "mode": mode, "budget": b, "budget_arg": float(budget),
              "embedding_key": ctx.embedding_key or "", "seed": seed, "layer": layer or "",
              "library_key": library_key or "", "sampled_key": sampled_key or "",
              "sampler": sampler_params(sampler), **ctx.info}
    history = pd.DataFrame([{"round": lab_round, "method": method_name, "mode": mode, "n_new": b,
                             "n_measured_before": int(measured.sum()), "n_sampled": int(sampled.sum()),
                             "seed": seed}])
    prev_uns = table.uns.get(key_added)
    if mode == "propose" and isinstance(prev_uns, dict) and isinstance(prev_uns.get("history"), pd.DataFrame):
        history = pd.concat([prev_uns["history"], history], ignore_index=True)
    logger.info("active_sample[%s/%s]: %d new spots (%d sampled of %d)", method_name, mode, b, int(sampled.sum()), n)
    if not inplace:
        out.attrs["history"] = history
        return out
    for key, emb in computed.items():
        table.obsm[key] = emb.astype(np.float32)
        log_added("obsm", key)
    table.obs[key_added] = sampled
    table.obs[round_key] = rnd
    table.uns[key_added] = {"params": params, "rounds": rounds_df, "history": history}
    log_added("obs", key_added, start)
    log_added("obs", round_key)
    log_added("uns", key_added)
    return None
