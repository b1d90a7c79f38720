"""Plug-in rules that choose the next spots for a pathologist to label (active annotation).

A rule is an :class:`AnnotationRule`; :func:`register_annotation_rule` adds one under a name
that :func:`stimg.tl.annotate` and :func:`stimg.tl.simulate_annotation` accept as ``rule=``.
Built in: ``'least_confidence'`` (ActiveVisium's default), ``'margin'``, ``'entropy'`` — each
an :class:`UncertaintyRule` (top uncertain spots → k-means → spot nearest each centroid) —
and ``'random'``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SelectionContext:
    """What a rule may look at when choosing spots.

    Attributes
    ----------
    candidates
        Integer positions (rows of the table) of the spots that may be chosen (unlabelled).
    proba
        ``(n_obs, K)`` class probabilities of every spot from the current model.
    features
        ``(n_obs, d)`` representation used for diversity (the model's latent space).
    """

    candidates: np.ndarray
    proba: np.ndarray
    features: np.ndarray


class AnnotationRule:
    """Base class of selection rules: subclass and implement :meth:`select`.

    Examples
    --------
    >>> import numpy as np, stimg as si
    >>> class Lowest(si.tl.AnnotationRule):
    ...     def select(self, ctx, n_new, rng):
    ...         return ctx.candidates[np.argsort(ctx.proba[ctx.candidates].max(1))[:n_new]]
    >>> si.tl.register_annotation_rule("lowest_max", Lowest())
    """

    def select(self, ctx: SelectionContext, n_new: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``n_new`` distinct positions from ``ctx.candidates``.

        Parameters
        ----------
        ctx
            Candidates, probabilities and features.
        n_new
            Number of spots to choose (never more than the candidates).
        rng
            Random generator (seeded by the caller).
        """
        raise NotImplementedError


def least_confidence(proba: np.ndarray) -> np.ndarray:
    """``(1 − max_k p_k) · K / (K − 1)``: 0 when certain, 1 when uniform (ActiveVisium eq. 2)."""
    k = proba.shape[1]
    return (1.0 - proba.max(1)) * (k / max(k - 1, 1))


def margin(proba: np.ndarray) -> np.ndarray:
    """``1 − (p_(1) − p_(2))``: one minus the gap between the two most probable classes."""
    if proba.shape[1] < 2:
        return np.zeros(len(proba))
    top2 = -np.partition(-proba, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy(proba: np.ndarray) -> np.ndarray:
    """Normalised entropy ``−Σ p log p / log K`` in ``[0, 1]``."""
    k = proba.shape[1]
    p = np.clip(proba, 1e-12, 1.0)
    return -(p * np.log(p)).sum(1) / np.log(max(k, 2))


class UncertaintyRule(AnnotationRule):
    """Most uncertain spots, made diverse: top fraction by a score → k-means → nearest to each centroid.

    The ``top_fraction`` most uncertain candidates — at least ``pool_factor · n_new`` of them —
    are clustered into ``n_new`` groups by k-means in ``ctx.features``; from each group the spot
    closest to its centroid is chosen (ActiveVisium §3.2, ``top_fraction = 0.05``). On the
    paper's sections (3,000–6,000 spots) the top 5 % holds about 2.5–5 × ``n_new`` spots. When the
    pool holds no more than ``n_new`` spots — with the defaults, whenever at most
    ``n_new / top_fraction`` (20 × ``n_new``) spots are unlabelled, e.g. every HER2ST section —
    there is nothing to cluster and the ``n_new`` most uncertain spots are taken.
    ``pool_factor > 1`` forces the clustering on such small sections; on HER2ST (A1 and C2–C6,
    simulated) pools of 2–4 × ``n_new`` lowered the mean weighted-F1 gain over random, most on
    A1 (``benchmarks/results/annotation_her2st.md``), so the default is 1.

    Parameters
    ----------
    score
        ``proba (n, K) → uncertainty (n,)``, higher = more uncertain.
    top_fraction
        Share of the candidates kept before clustering.
    pool_factor
        Minimum pool size as a multiple of ``n_new`` (1: no minimum beyond ``n_new``).
    diverse
        ``False`` skips the clustering and takes the ``n_new`` most uncertain spots.
    """

    def __init__(self, score: Callable[[np.ndarray], np.ndarray], *, top_fraction: float = 0.05,
                 pool_factor: float = 1.0, diverse: bool = True) -> None:
        if not 0 < float(top_fraction) <= 1:
            msg = f"top_fraction must be in (0, 1], got {top_fraction!r}."
            raise ValueError(msg)
        if not float(pool_factor) >= 1:
            msg = f"pool_factor must be ≥ 1, got {pool_factor!r}."
            raise ValueError(msg)
        self.score, self.top_fraction, self.diverse = score, float(top_fraction), bool(diverse)
        self.pool_factor = float(pool_factor)

    def __repr__(self) -> str:
        name = getattr(self.score, "__name__", "score")
        return (f"UncertaintyRule({name}, top_fraction={self.top_fraction}, pool_factor={self.pool_factor}, "
                f"diverse={self.diverse})")

    def select(self, ctx: SelectionContext, n_new: int, rng: np.random.Generator) -> np.ndarray:  # noqa: D102
        cand = np.asarray(ctx.candidates)
        s = np.asarray(self.score(ctx.proba[cand]), dtype=np.float64)
        order = np.lexsort((rng.random(len(cand)), -s))  # ties broken at random
        n_pool = int(min(len(cand), max(np.ceil(self.top_fraction * len(cand)), np.ceil(self.pool_factor * n_new))))
        pool = cand[order[:n_pool]]
        if not self.diverse or n_pool <= n_new:
            return pool[:n_new]
        return diverse_centroids(ctx.features, pool, n_new, rng)


class RandomRule(AnnotationRule):
    """Uniformly random unlabelled spots (the baseline)."""

    def __repr__(self) -> str:
        return "RandomRule()"

    def select(self, ctx: SelectionContext, n_new: int, rng: np.random.Generator) -> np.ndarray:  # noqa: D102
        return rng.choice(np.asarray(ctx.candidates), size=n_new, replace=False)


def diverse_centroids(features: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """k-means (``n`` clusters) on ``features[pool]``; the pool spot nearest each centroid."""
    from sklearn.cluster import KMeans

    from ..models._sampling._baselines import _nearest_unique

    x = np.asarray(features, dtype=np.float64)
    km = KMeans(n, n_init=3, random_state=int(rng.integers(2**31))).fit(x[pool])
    return np.asarray(_nearest_unique(x, km.cluster_centers_, pool), dtype=np.int64)


ANNOTATION_RULES: dict[str, AnnotationRule] = {
    "least_confidence": UncertaintyRule(least_confidence),
    "margin": UncertaintyRule(margin),
    "entropy": UncertaintyRule(entropy),
    "random": RandomRule(),
}


def register_annotation_rule(name: str, rule: AnnotationRule, *, overwrite: bool = False) -> None:
    """Add a selection rule for :func:`~stimg.tl.annotate` and :func:`~stimg.tl.simulate_annotation`.

    Parameters
    ----------
    name
        Name to pass as ``rule=``.
    rule
        An :class:`AnnotationRule` (e.g. ``UncertaintyRule(my_score, top_fraction=0.1)``).
    overwrite
        Replace an existing rule of that name.

    Examples
    --------
    >>> import stimg as si
    >>> from stimg.tl import UncertaintyRule, least_confidence
    >>> si.tl.register_annotation_rule("lc_top10", UncertaintyRule(least_confidence, top_fraction=0.1))
    >>> "lc_top10" in si.tl.annotation_rules()
    True
    """
    if not isinstance(rule, AnnotationRule):
        msg = f"rule must be an AnnotationRule (subclass it and implement select), got {type(rule).__name__}."
        raise TypeError(msg)
    if name in ANNOTATION_RULES and not overwrite:
        msg = f"An annotation rule named {name!r} exists; pass overwrite=True to replace it."
        raise ValueError(msg)
    ANNOTATION_RULES[str(name)] = rule


def annotation_rules() -> list[str]:
    """Names of the registered selection rules.

    Examples
    --------
    >>> import stimg as si
    >>> si.tl.annotation_rules()[:4]
    ['least_confidence', 'margin', 'entropy', 'random']
    """
    return list(ANNOTATION_RULES)


def get_rule(rule: str | AnnotationRule) -> tuple[str, AnnotationRule]:
    """``(name, rule)`` from a registered name or an :class:`AnnotationRule` instance."""
    if isinstance(rule, AnnotationRule):
        return type(rule).__name__, rule
    if rule not in ANNOTATION_RULES:
        msg = (f"Unknown annotation rule {rule!r}; choose one of {annotation_rules()} or register one with "
               "si.tl.register_annotation_rule.")
        raise ValueError(msg)
    return str(rule), ANNOTATION_RULES[rule]
