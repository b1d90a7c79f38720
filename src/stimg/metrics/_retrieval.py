"""Cross-modal retrieval metrics defined once: recall@k over the whole test set, batch silhouette."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._validate import check_matrix

ALL = "all"  # scope of recall over the whole test set


@dataclass
class RecallResult:
    """Recall@k of paired retrieval in both directions, with chance levels.

    Attributes
    ----------
    table
        Tidy :class:`~pandas.DataFrame` with columns ``scope`` (``'all'``: over the whole test
        set; ``'in-batch B'``: within random batches of ``B`` pairs, as HESCAPE reports),
        ``direction`` (e.g. ``'image→gene'``), ``k``, ``recall``, ``chance`` and
        ``over_chance`` (``recall / chance``).
    n
        Number of pairs.
    ranks
        Per direction, the expected 0-based rank of each query's true partner among all ``n``
        candidates (ties broken at random, in expectation).

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> z = np.eye(20)
    >>> res = si.metrics.recall_at_k(z, z, k=(1, 5))
    >>> float(res.value(1))
    1.0
    """

    table: pd.DataFrame
    n: int
    ranks: dict[str, np.ndarray]

    def value(self, k: int, direction: str | None = None, scope: str = ALL) -> float:
        """Recall@``k`` for one direction (``None``: the first) and scope."""
        t = self.table[(self.table["scope"] == scope) & (self.table["k"] == int(k))]
        if direction is not None:
            t = t[t["direction"] == direction]
        if t.empty:
            msg = (f"no recall@{k} for direction={direction!r}, scope={scope!r}; available: "
                   f"k={sorted(self.table['k'].unique())}, directions={list(self.table['direction'].unique())}, "
                   f"scopes={list(self.table['scope'].unique())}.")
            raise KeyError(msg)
        return float(t["recall"].iloc[0])


def _unit(x: np.ndarray) -> np.ndarray:
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(nrm > 0, nrm, 1.0)


def _expected_ranks(q: np.ndarray, r: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query i: number of candidates more similar than its partner i, and number tied with it."""
    n = q.shape[0]
    greater = np.empty(n, dtype=np.int64)
    ties = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        S = q[s:s + chunk] @ r.T
        rows = np.arange(S.shape[0])
        d = S[rows, s + rows][:, None]
        tol = 1e-6 * np.maximum(1.0, np.abs(d))
        greater[s:s + chunk] = (S > d + tol).sum(1)
        ties[s:s + chunk] = (np.abs(S - d) <= tol).sum(1) - 1  # minus the partner itself
    return greater, ties


def _recall_from_ranks(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """P(partner among the top k) per query when ties are broken uniformly at random."""
    return np.clip((k - greater) / (ties + 1.0), 0.0, 1.0)


def recall_at_k(
    query,
    reference,
    k: int | Sequence[int] = (1, 5, 10),
    *,
    names: tuple[str, str] = ("query", "reference"),
    in_batch: int | None = None,
    n_repeats: int = 10,
    seed: int = 0,
) -> RecallResult:
    """Recall@k of paired cross-modal retrieval over the whole test set, both directions, with chance.

    Row ``i`` of ``query`` and row ``i`` of ``reference`` are a pair (e.g. a spot's image
    embedding and its expression embedding). For each query the candidates are **all** ``n``
    reference rows, ranked by cosine similarity; recall@k is the fraction of queries whose
    partner is among the top ``k`` (ties broken at random, in expectation), and the chance level
    is ``k / n``. The reverse direction ranks query rows for each reference row.

    HESCAPE instead scores within each minibatch of 64 pairs, where chance recall@5 is already
    7.8 %; pass ``in_batch=64`` to also report what that protocol would show for the same
    embeddings (random partitions into batches of ``in_batch`` pairs, averaged over
    ``n_repeats``; chance ``k / batch size``). Report the whole-test-set numbers.

    Parameters
    ----------
    query, reference
        ``(n, d)`` paired embeddings (normalised here).
    k
        Cut-off(s).
    names
        Names of the two sides, used in ``direction`` (``'image→gene'`` for ``('image', 'gene')``).
    in_batch
        Batch size for the additional in-batch scores; ``None`` skips them.
    n_repeats
        Random partitions averaged for the in-batch scores.
    seed
        Seed of the partitions.

    Returns
    -------
    :class:`~stimg.metrics.RecallResult`.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(size=(300, 16))
    >>> gene = img + rng.normal(scale=2.0, size=img.shape)
    >>> res = si.metrics.recall_at_k(img, gene, names=("image", "gene"), in_batch=64)
    >>> res.table.columns.tolist()
    ['scope', 'direction', 'k', 'recall', 'chance', 'over_chance']
    """
    q = check_matrix(query, "query").astype(np.float64)
    r = check_matrix(reference, "reference", n_obs=q.shape[0], n_cols=q.shape[1]).astype(np.float64)
    n = q.shape[0]
    if n < 2:
        msg = f"recall@k needs at least 2 pairs, got {n}."
        raise ValueError(msg)
    ks = [int(x) for x in np.atleast_1d(k)]
    if any(x < 1 for x in ks):
        msg = f"k must be ≥ 1, got {ks}."
        raise ValueError(msg)
    if in_batch is not None and int(in_batch) < 2:
        msg = f"in_batch must be ≥ 2 pairs (or None), got {in_batch!r}."
        raise ValueError(msg)
    if len(names) != 2:
        msg = f"names must be two strings (query side, reference side), got {names!r}."
        raise ValueError(msg)
    q, r = _unit(q), _unit(r)
    dirs = {f"{names[0]}→{names[1]}": (q, r), f"{names[1]}→{names[0]}": (r, q)}
    rows, ranks = [], {}
    for name, (a, b) in dirs.items():
        g, t = _expected_ranks(a, b)
        ranks[name] = g + t / 2.0
        for kk in ks:
            rec = float(_recall_from_ranks(g, t, kk).mean())
            rows.append((ALL, name, kk, rec, min(1.0, kk / n)))
    if in_batch is not None:
        B = int(in_batch)
        rng = np.random.default_rng(seed)
        scope = f"in-batch {B}"
        acc = {(name, kk): [0.0, 0.0] for name in dirs for kk in ks}
        for _ in range(int(n_repeats)):
            perm = rng.permutation(n)
            for s in range(0, n, B):
                idx = perm[s:s + B]
                m = len(idx)
                if m < 2:
                    continue
                for name, (a, b) in dirs.items():
                    g, t = _expected_ranks(a[idx], b[idx])
                    for kk in ks:
                        acc[(name, kk)][0] += float(_recall_from_ranks(g, t, kk).sum())
                        acc[(name, kk)][1] += m * min(1.0, kk / m)
        total = sum(len(perm[s:s + B]) for s in range(0, n, B) if len(perm[s:s + B]) >= 2) * int(n_repeats)
        for (name, kk), (hit, chance) in acc.items():
            rows.append((scope, name, kk, hit / total, chance / total))
    table = pd.DataFrame(rows, columns=["scope", "direction", "k", "recall", "chance"])
    table["over_chance"] = table["recall"] / table["chance"]
    return RecallResult(table=table, n=n, ranks=ranks)


def silhouette_batch(
    embedding,
    batch: Sequence,
    *,
    labels: Sequence | None = None,
    metric: str = "cosine",
    rescale: bool = True,
) -> float:
    """Batch silhouette (scib-metrics ASW-batch) of an embedding: how well sections mix.

    With ``rescale`` (the scIB convention) 1 means batches (sections, patients) are perfectly
    mixed within each label, 0 that they separate completely. HESCAPE found retrieval recall to
    fall as this batch effect grows. Computed with :func:`scib_metrics.silhouette_batch`.

    Parameters
    ----------
    embedding
        ``(n, d)`` embedding (e.g. ``.obsm['si_align_image']``).
    batch
        Batch of each row (section or patient).
    labels
        Biological label of each row (e.g. cell type or region); ``None`` treats all rows as one
        label.
    metric
        ``'cosine'`` (the geometry of the joint space) or ``'euclidean'`` (scIB's default).
    rescale
        Map to ``[0, 1]``, higher = better mixed.

    Returns
    -------
    The batch silhouette.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 8))
    >>> round(si.metrics.silhouette_batch(x, ["a", "b"] * 50), 1)  # doctest: +SKIP
    0.9
    """
    x = check_matrix(embedding, "embedding").astype(np.float32)
    b = np.asarray(batch).astype(str)
    if b.shape != (x.shape[0],):
        msg = f"batch has {b.shape[0] if b.ndim else 0} entries for {x.shape[0]} rows."
        raise ValueError(msg)
    if len(np.unique(b)) < 2:
        msg = "silhouette_batch needs at least 2 batches (e.g. sections); got one."
        raise ValueError(msg)
    lab = np.zeros(x.shape[0], dtype=str) if labels is None else np.asarray(labels).astype(str)
    if lab.shape != (x.shape[0],):
        msg = f"labels has {lab.shape[0] if lab.ndim else 0} entries for {x.shape[0]} rows."
        raise ValueError(msg)
    if metric not in ("cosine", "euclidean"):
        msg = f"metric must be 'cosine' or 'euclidean', got {metric!r}."
        raise ValueError(msg)
    import logging

    import scib_metrics

    jax_logger = logging.getLogger("jax._src.xla_bridge")  # "An NVIDIA GPU may be present ..." chatter
    old = jax_logger.level
    jax_logger.setLevel(logging.ERROR)
    try:
        return float(scib_metrics.silhouette_batch(x, lab, b, rescale=rescale, metric=metric))
    finally:
        jax_logger.setLevel(old)
