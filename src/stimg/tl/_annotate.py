"""Active annotation (ActiveVisium): a pathologist labels proposed spots, a classifier predicts the rest."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._spatial import get_table
from .._utils import progress_bar
from .._validate import assert_key_in, check_matrix
from ._annotation_rules import AnnotationRule, SelectionContext, get_rule

ANNOTATION_KEY = "si_annotation"
TO_LABEL_KEY = "si_to_label"


@dataclass
class AnnotationRound:
    """The result of one :func:`annotate` round.

    Attributes
    ----------
    model
        The trained :class:`~stimg.models.SpotClassifier`; pass it back as ``model=`` next round
        (warm start). ``None`` in the first round, before any label exists.
    round
        Round number: 0 for the initial proposal, then one per training.
    rule
        Selection rule that proposed :attr:`to_label`.
    to_label
        Spots (``.obs`` names) proposed for labelling next.
    annotation
        Labels where given, predictions elsewhere (categorical); ``None`` without a model.
    confidence
        Model probability of :attr:`annotation`'s class per spot; ``None`` without a model.
    proba
        Class probabilities (spots × classes); ``None`` without a model.
    params
        Parameters of the round (as stored in ``.uns[key_added]['params']``).
    """

    model: Any
    round: int
    rule: str
    to_label: pd.Index
    annotation: pd.Series | None = None
    confidence: pd.Series | None = None
    proba: pd.DataFrame | None = None
    params: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        what = "initial proposal" if self.model is None else f"{self.proba.shape[1]} classes predicted"
        return f"AnnotationRound(round={self.round}, {what}, {len(self.to_label)} spots to label, rule={self.rule!r})"


# --------------------------------------------------------------------------- helpers shared with simulation
def _labels(table, labels_key: str, *, allow_missing_column: bool) -> pd.Series:
    from ..models._classifier import _label_strings

    if labels_key not in table.obs:
        if not allow_missing_column:
            msg = (f"{labels_key!r} not found in table.obs (columns: {list(table.obs.columns)[:20]}); store the labels "
                   "there, a missing value marking an unlabelled spot.")
            raise KeyError(msg)
        logger.info("annotate: .obs[%r] does not exist yet: no spot is labelled", labels_key)
        return pd.Series([None] * table.n_obs, index=table.obs_names, dtype=object)
    return _label_strings(table.obs[labels_key], labels_key)


def _embedding_key(table, embedding_key: str | None) -> str:
    """The image embedding: ``embedding_key`` or the first ``X_*`` key that is not an expression embedding."""
    from ._active_sample import _NOT_IMAGE

    if embedding_key is not None:
        assert_key_in(table.obsm, embedding_key, where="table.obsm", hint="Compute image embeddings with si.pp.embed.")
        return embedding_key
    cands = [k for k in table.obsm if k.startswith("X_") and k not in _NOT_IMAGE | {"X_harmony"}]
    if not cands:
        msg = (f"No image embedding in table.obsm (keys: {list(table.obsm)}); run si.pp.embed(data) first, or pass "
               "embedding_key=.")
        raise KeyError(msg)
    return cands[0]


def initial_set(features: np.ndarray, n: int, rng: np.random.Generator, *, truth: Sequence | None = None,
                available: np.ndarray | None = None) -> np.ndarray:
    """ActiveVisium's first round: the spot nearest each of ``n`` k-means centroids of the image features.

    With ``truth`` (labels known to the caller, e.g. in simulation), one random spot of each class
    the clusters missed is added.

    Parameters
    ----------
    features
        ``(n_obs, d)`` image embedding (standardised and reduced to 50 PCs for clustering).
    n
        Number of clusters.
    rng
        Random generator.
    truth
        Labels of every spot (missing = unknown) to complete the class coverage.
    available
        Boolean mask of spots that may be chosen; ``None``: all.

    Returns
    -------
    Integer positions, the k-means picks first.
    """
    from ..models._sampling._baselines import kmeans_select

    n_obs = len(features)
    ok = np.ones(n_obs, bool) if available is None else np.asarray(available, bool)
    picks = list(kmeans_select(features, int(min(n, ok.sum())), rng, exclude=np.flatnonzero(~ok)))
    if truth is not None:
        t = pd.Series(np.asarray(truth, dtype=object))
        seen = set(t.iloc[picks].dropna())
        for c in pd.unique(t.dropna()):
            if c in seen:
                continue
            pool = np.flatnonzero((t == c).to_numpy() & ok)
            pool = np.setdiff1d(pool, picks)
            if pool.size:
                picks.append(int(rng.choice(pool)))
    return np.asarray(picks, dtype=np.int64)


def _propose(rule_name: str, rule: AnnotationRule, proba: np.ndarray, features: np.ndarray, candidates: np.ndarray,
             n_new: int, rng: np.random.Generator) -> np.ndarray:
    n = int(min(n_new, len(candidates)))
    if n == 0:
        return np.array([], dtype=np.int64)
    chosen = np.asarray(rule.select(SelectionContext(np.asarray(candidates), proba, features), n, rng), dtype=np.int64)
    if len(chosen) != n or len(np.unique(chosen)) != n or not np.isin(chosen, candidates).all():
        msg = (f"annotation rule {rule_name!r} returned {len(chosen)} positions ({len(np.unique(chosen))} distinct, "
               f"{int(np.isin(chosen, candidates).sum())} unlabelled); it must return {n} distinct unlabelled spots.")
        raise RuntimeError(msg)
    return chosen


def _annotation(labels: pd.Series, proba: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Labels where given, predictions elsewhere; and the model probability of that class."""
    classes = list(proba.columns)
    p = proba.to_numpy()
    pred = np.asarray(classes, dtype=object)[p.argmax(1)]
    lab = labels.to_numpy(dtype=object)
    given = pd.notna(lab)
    out = np.where(given, lab, pred)
    cats = classes + [c for c in pd.unique(out) if c not in classes]
    idx = {c: i for i, c in enumerate(classes)}
    conf = np.array([p[i, idx[c]] if c in idx else np.nan for i, c in enumerate(out)], dtype=np.float64)
    return (pd.Series(pd.Categorical(out, categories=cats), index=labels.index),
            pd.Series(conf, index=labels.index))


def _check_outputs(table, key_added: str, to_label_key: str | None, labels_key: str | None) -> None:
    """Refuse to overwrite columns that a previous stimg annotation did not write."""
    keys = {key_added, f"{key_added}_confidence"} | ({to_label_key} if to_label_key else set())
    if labels_key in keys:
        msg = f"labels_key {labels_key!r} is also an output column; pick another key_added/to_label_key."
        raise ValueError(msg)
    prev = table.uns.get(key_added)
    ours = isinstance(prev, dict) and isinstance(prev.get("params"), dict) and prev["params"].get("writer") == "stimg"
    owned = set()
    if ours:
        owned = {key_added, f"{key_added}_confidence", prev["params"].get("to_label_key")}
    clash = [k for k in sorted(keys) if k in table.obs and k not in owned]
    if f"{key_added}_proba" in table.obsm and not ours:
        clash.append(f"obsm['{key_added}_proba']")
    if clash:
        msg = (f"table.obs already holds {clash}, not written by stimg's annotation; pass another key_added= / "
               "to_label_key=, or delete those columns.")
        raise ValueError(msg)


def _write(table, *, key_added: str, annotation: pd.Series | None, confidence: pd.Series | None,
           proba: pd.DataFrame | None, to_label_key: str | None, to_label: np.ndarray | None, uns: dict,
           start: float) -> None:
    if annotation is not None:
        table.obs[key_added] = annotation.array
        table.obs[f"{key_added}_confidence"] = confidence.to_numpy()
        table.obsm[f"{key_added}_proba"] = proba.set_axis(table.obs_names, axis=0)
        log_added("obs", key_added, start)
        log_added("obs", f"{key_added}_confidence")
        log_added("obsm", f"{key_added}_proba")
    if to_label_key is not None:
        table.obs[to_label_key] = to_label
        log_added("obs", to_label_key)
    table.uns[key_added] = uns
    log_added("uns", key_added)


# --------------------------------------------------------------------------- public API
@d.dedent
def annotate(
    data: Any,
    labels_key: str,
    *,
    n_new: int = 55,
    rule: str | AnnotationRule = "least_confidence",
    model: Any = None,
    embedding_key: str | None = None,
    expression: bool | str = False,
    layer: str | None = None,
    classes: Sequence[str] | None = None,
    max_epochs: int | None = None,
    train_kwargs: dict | None = None,
    seed: int | None = None,
    table_key: str = TABLE_KEY,
    key_added: str = ANNOTATION_KEY,
    to_label_key: str = TO_LABEL_KEY,
    inplace: bool = True,
) -> AnnotationRound:
    """One round of active annotation: train on the labelled spots, predict all, propose the next ones.

    ActiveVisium's loop, one call per round:

    1. **First round** (fewer than two classes labelled, no ``model``): propose the unlabelled
       spot nearest each of ``n_new`` k-means centroids of the image embedding (standardised,
       50 PCs). Spots labelled beforehand (e.g. a few examples of a rare class) join this set.
    2. **Later rounds**: train a :class:`~stimg.models.SpotClassifier` on every labelled spot
       (class-weighted cross-entropy, weights recomputed from this round's labels; warm start
       from ``model``), predict every spot, and propose ``n_new`` unlabelled spots with ``rule``
       — by default least-confidence ``(1 − max p)·K/(K−1)``, the top 5 %% most uncertain
       clustered by k-means in the model's latent space, the spot nearest each centroid. On a
       section with at most ``20 · n_new`` unlabelled spots the top 5 %% holds at most
       ``n_new`` spots, and the ``n_new`` most uncertain ones are proposed (see
       :class:`~stimg.tl.UncertaintyRule`).

    A missing value (``None``/``NaN``) in ``.obs[labels_key]`` marks an unlabelled spot. Labels
    read from Loupe Browser (:func:`stimg.io.read_loupe`) go straight into that column. With a
    ``model`` trained on another section and fewer than two classes labelled, the round
    predicts with it without training and proposes its most uncertain spots (annotation transfer).

    Parameters
    ----------
    %(data)s
    labels_key
        ``.obs`` column of the pathologist's labels (missing = unlabelled). May be absent in
        the first round.
    n_new
        Spots to propose (ActiveVisium: 55).
    rule
        A registered rule (:func:`~stimg.tl.annotation_rules`: ``'least_confidence'``,
        ``'margin'``, ``'entropy'``, ``'random'``) or an :class:`~stimg.tl.AnnotationRule`.
    model
        The :class:`~stimg.models.SpotClassifier` of the previous round (``AnnotationRound.model``),
        trained further in place; a model of another section is copied and attached to this one.
        ``None`` creates one.
    embedding_key
        ``.obsm`` key of the image embedding (from :func:`stimg.pp.embed`); ``None`` picks the
        first ``X_*`` key that is not an expression embedding. Neighbourhood features from
        :func:`stimg.pp.spatial_context` classify much better: in simulated annotation on HER2ST
        (``benchmarks/annotation_her2st.py --context-um 500``, 10 seeds) the first trained round's
        weighted F1 rose from 0.82 to 0.92 on A1's pathologist labels and from 0.33–0.42 to
        0.47–0.61 on C2–C6's expression clusters.
    expression
        Expression branch of a new model: ``False``, ``True`` (1,000 HVGs) or an ``.obsm`` key
        (see :class:`~stimg.models.SpotClassifier`). In simulated annotation on HER2ST (20 seeds)
        with ``True``, least-confidence beat random at every round 2–5 on A1 and C2–C6 (mean gain
        +0.036 weighted F1; on C2–C6 the labels are expression clusters, so this is circular
        there), while on A1 the 1,000 HVGs lowered the first round's F1 from 0.82 to 0.73.
    layer
        Raw-count layer for ``expression=True``.
    classes
        Class names known in advance (a new model's output order).
    max_epochs
        Epochs per round (default 50).
    train_kwargs
        More :meth:`~stimg.models.SpotClassifier.train` options (``lr``, ``batch_size`` …).
    seed
        Seed of clustering, selection and training; ``None`` uses :attr:`stimg.settings.seed`.
    %(table_key)s
    key_added
        Prefix of the outputs (see Returns).
    to_label_key
        Boolean ``.obs`` column of the proposed spots.
    %(inplace)s

    Returns
    -------
    An :class:`~stimg.tl.AnnotationRound` (with the model for the next round). With ``inplace``
    the table also gets

    - ``.obs[key_added]``: labels where given, predictions elsewhere (categorical),
    - ``.obs[f'{key_added}_confidence']``: the model's probability of that class,
    - ``.obsm[f'{key_added}_proba']``: class probabilities (DataFrame, one column per class),
    - ``.obs[to_label_key]``: ``True`` for the spots proposed for labelling,
    - ``.uns[key_added]``: ``{'params': …, 'history': DataFrame}`` (one row per round).

    The first round writes only ``to_label_key`` and ``.uns``. Nothing is written if the
    round fails.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(300, 20, image=False, as_anndata=True)
    >>> res = si.tl.annotate(adata, "pathologist", n_new=20)  # round 0: k-means proposal
    >>> int(adata.obs["si_to_label"].sum())
    20
    >>> adata.obs["pathologist"] = adata.obs["cell_type"].where(adata.obs["si_to_label"])  # the labels
    >>> res = si.tl.annotate(adata, "pathologist", n_new=20, model=res.model)
    >>> sorted(adata.obsm["si_annotation_proba"].columns)[:2]
    ['type_0', 'type_1']
    """
    from .._settings import settings

    start = time.perf_counter()
    seed = settings.seed if seed is None else int(seed)
    table = get_table(data, table_key)
    rule_name, rule_obj = get_rule(rule)
    if isinstance(n_new, bool) or not isinstance(n_new, int | np.integer) or n_new < 1:
        msg = f"n_new must be a positive whole number of spots, got {n_new!r}."
        raise ValueError(msg)
    if table.n_obs == 0:
        msg = "The table has no spots (n_obs == 0); check the filtering that produced it."
        raise ValueError(msg)
    _check_outputs(table, key_added, to_label_key, labels_key)
    labels = _labels(table, labels_key, allow_missing_column=True)
    labelled = labels.notna().to_numpy()
    if model is not None:
        from ..models._classifier import SpotClassifier

        if not isinstance(model, SpotClassifier):
            msg = f"model must be a SpotClassifier (AnnotationRound.model), got {type(model).__name__}."
            raise TypeError(msg)
        if model.labels_key != labels_key:
            msg = (f"model was trained on labels {model.labels_key!r}, not {labels_key!r}; pass the same labels_key "
                   "(or model=None to start a new model).")
            raise ValueError(msg)
        emb_key, emb = model.embedding_key, None
    else:
        emb_key = _embedding_key(table, embedding_key)
        emb = check_matrix(table.obsm[emb_key], f"obsm[{emb_key!r}]", n_obs=table.n_obs)
    prev = table.uns.get(key_added)
    history = (prev.get("history") if isinstance(prev, dict) else None)
    history = history.copy() if isinstance(history, pd.DataFrame) else pd.DataFrame()
    rnd = 0 if history.empty else int(history["round"].max()) + 1
    rng = np.random.default_rng([seed, rnd])
    candidates = np.flatnonzero(~labelled)
    if n_new > candidates.size:
        logger.info("annotate: only %d unlabelled spots left; proposing all of them", candidates.size)
    annotation = confidence = proba = None
    n_classes = int(labels.dropna().nunique())
    if n_classes < 2 and model is None:  # nothing to train on yet: the initial set
        if labelled.any():
            logger.info("annotate: %d spots already labelled (%s) join the initial set", int(labelled.sum()),
                        sorted(labels.dropna().unique()))
        chosen = initial_set(emb, n_new, rng, available=~labelled)
        rule_used, trained = "kmeans (initial set)", None
    else:
        trained = model
        if trained is not None and trained.adata is not table:
            trained = trained.attach(table)
        if trained is None:
            from ..models._classifier import SpotClassifier

            trained = SpotClassifier(table, labels_key, embedding_key=emb_key, expression=expression, layer=layer,
                                     classes=classes, seed=seed)
        if n_classes >= 2:  # otherwise a transferred model predicts without training
            trained.train(max_epochs, seed=seed + rnd, progress=False, **(train_kwargs or {}))
        proba = trained.predict_proba()
        latent = trained.get_latent()
        chosen = _propose(rule_name, rule_obj, proba.to_numpy(), latent, candidates, n_new, rng)
        annotation, confidence = _annotation(labels, proba)
        rule_used = rule_name
    to_label = np.zeros(table.n_obs, dtype=bool)
    to_label[chosen] = True
    row = {"round": rnd, "rule": rule_used, "n_labelled": int(labelled.sum()),
           "n_classes_labelled": int(labels.dropna().nunique()), "n_proposed": int(len(chosen)),
           "seconds": float(time.perf_counter() - start)}
    history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
    params = {"writer": "stimg", "function": "annotate", "labels_key": labels_key, "rule": rule_used,
              "n_new": int(n_new), "embedding_key": emb_key, "seed": seed, "round": rnd,
              "to_label_key": to_label_key, "classes": [] if trained is None else list(trained.classes_)}
    res = AnnotationRound(trained, rnd, rule_used, table.obs_names[chosen], annotation, confidence, proba, params)
    logger.info("annotate round %d: %d labelled spots, %d proposed (%s)", rnd, int(labelled.sum()), len(chosen),
                rule_used)
    if inplace:
        _write(table, key_added=key_added, annotation=annotation, confidence=confidence, proba=proba,
               to_label_key=to_label_key, to_label=to_label, uns={"params": params, "history": history}, start=start)
    return res


@d.dedent
def predict_annotation(
    data: Any,
    model: Any,
    *,
    labels_key: str | None = None,
    table_key: str = TABLE_KEY,
    key_added: str = ANNOTATION_KEY,
    inplace: bool = True,
) -> pd.DataFrame | None:
    """Apply a trained :class:`~stimg.models.SpotClassifier` to a section (annotation transfer).

    The section needs the same image embedding (same encoder, patch µm and px) and, for a
    model with an expression branch, the same expression features — for another section,
    integrate both sections first with :func:`stimg.pp.integrate_expression` and train with
    ``expression='X_harmony'``.

    Parameters
    ----------
    %(data)s
    model
        A trained :class:`~stimg.models.SpotClassifier` (e.g. ``AnnotationRound.model`` or
        :meth:`~stimg.models.SpotClassifier.load`).
    labels_key
        Optional ``.obs`` column of labels that take precedence over predictions where given.
    %(table_key)s
    key_added
        ``.obs[key_added]`` (class), ``.obs[f'{key_added}_confidence']``,
        ``.obsm[f'{key_added}_proba']`` and ``.uns[key_added]['params']``.
    %(inplace)s

    Returns
    -------
    With ``inplace=False`` a DataFrame with the class, its confidence and the class
    probabilities; otherwise ``None``.

    Examples
    --------
    >>> si.tl.predict_annotation(other_section, res.model)  # doctest: +SKIP
    """
    from ..models._base import check_trained
    from ..models._classifier import SpotClassifier

    start = time.perf_counter()
    table = get_table(data, table_key)
    if not isinstance(model, SpotClassifier):
        msg = f"model must be a trained SpotClassifier, got {type(model).__name__}."
        raise TypeError(msg)
    check_trained(model, "predicting")
    _check_outputs(table, key_added, None, labels_key)
    labels = (_labels(table, labels_key, allow_missing_column=False) if labels_key is not None
              else pd.Series([None] * table.n_obs, index=table.obs_names, dtype=object))
    proba = model.predict_proba(table)
    annotation, confidence = _annotation(labels, proba)
    if not inplace:
        out = pd.DataFrame({key_added: annotation, f"{key_added}_confidence": confidence})
        return pd.concat([out, proba.add_prefix("p_")], axis=1)
    params = {"writer": "stimg", "function": "predict_annotation", "labels_key": labels_key or "",
              "embedding_key": model.embedding_key, "classes": list(model.classes_), "to_label_key": ""}
    _write(table, key_added=key_added, annotation=annotation, confidence=confidence, proba=proba, to_label_key=None,
           to_label=None, uns={"params": params}, start=start)
    return None


@d.dedent
def simulate_annotation(
    data: Any,
    labels_key: str,
    *,
    rules: Sequence[str | AnnotationRule] = ("least_confidence", "random"),
    n_rounds: int = 10,
    n_new: int = 55,
    seeds: Iterable[int] = (0, 1, 2),
    n_initial: int | None = None,
    embedding_key: str | None = None,
    expression: bool | str = False,
    layer: str | None = None,
    max_epochs: int | None = None,
    train_kwargs: dict | None = None,
    table_key: str = TABLE_KEY,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Simulate active annotation on a fully labelled section (ActiveVisium §4.1).

    Labels are hidden and revealed only when a spot is chosen. For each seed, the initial set
    (k-means on the image embedding, ``n_initial`` clusters, plus one random spot of each
    class the clusters missed) is shared by all rules; then for ``n_rounds`` rounds a
    :class:`~stimg.models.SpotClassifier` is trained (warm start), scored against the hidden
    labels, and ``n_new`` spots are revealed with each rule. Round 1 is the model trained on
    the initial set, so all rules agree there. Spots without a label are left out.

    Parameters
    ----------
    %(data)s
    labels_key
        ``.obs`` column of the full labels (the ground truth).
    rules
        Rules to compare (names from :func:`~stimg.tl.annotation_rules` or rule objects);
        include ``'random'`` as the baseline.
    n_rounds
        Trainings per run.
    n_new
        Spots revealed per round.
    seeds
        One run per seed and rule (≥ 3 for mean ± sd).
    n_initial
        Size of the k-means initial set; ``None`` uses ``n_new``.
    embedding_key, expression, layer, max_epochs, train_kwargs
        As in :func:`annotate`.
    %(table_key)s
    %(progress)s

    Returns
    -------
    Tidy DataFrame with columns ``rule``, ``seed``, ``round``, ``n_labelled``, ``metric``,
    ``value``. Metrics, against the hidden labels over all spots: ``'weighted_f1'`` and
    ``'misclassified_pct'`` of the model's predictions (the paper's protocol),
    ``'weighted_f1_annotation'`` of labels-where-revealed plus predictions elsewhere (what
    the pathologist ends up with), and ``'weighted_f1_unlabelled'`` on the spots not yet
    revealed. :func:`~stimg.tl.annotation_summary` gives mean and sd over seeds. Nothing is
    written into ``data``.

    Examples
    --------
    >>> import stimg as si
    >>> adata = si.datasets.synthetic(300, 20, image=False, as_anndata=True)
    >>> res = si.tl.simulate_annotation(adata, "cell_type", n_rounds=3, n_new=20, seeds=[0, 1], max_epochs=10)
    >>> sorted(res["rule"].unique())
    ['least_confidence', 'random']
    """
    from anndata import AnnData

    from ..metrics import misclassified, weighted_f1
    from ..models._classifier import SpotClassifier

    table = get_table(data, table_key)
    truth_all = _labels(table, labels_key, allow_missing_column=False)
    keep = truth_all.notna().to_numpy()
    if int(keep.sum()) < 3:
        msg = f".obs[{labels_key!r}] labels {int(keep.sum())} spots; simulation needs a fully labelled section."
        raise ValueError(msg)
    if not keep.all():
        logger.info("simulate_annotation: %d spots without a label are left out", int((~keep).sum()))
    truth = truth_all[keep].to_numpy(dtype=object)
    if len(pd.unique(truth)) < 2:
        msg = f".obs[{labels_key!r}] has a single class; simulation needs at least two."
        raise ValueError(msg)
    resolved = [get_rule(r) for r in rules]
    if not resolved:
        msg = "rules is empty; pass e.g. ('least_confidence', 'random')."
        raise ValueError(msg)
    names = [n for n, _ in resolved]
    if len(set(names)) != len(names):
        msg = f"rules has duplicates: {names}."
        raise ValueError(msg)
    seeds = [int(s) for s in seeds]
    if not seeds:
        msg = "seeds is empty; pass at least one seed (≥ 3 for mean ± sd)."
        raise ValueError(msg)
    for name, v in (("n_rounds", n_rounds), ("n_new", n_new)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            msg = f"{name} must be a positive whole number, got {v!r}."
            raise ValueError(msg)
    emb_key = _embedding_key(table, embedding_key)
    emb = check_matrix(table.obsm[emb_key], f"obsm[{emb_key!r}]", n_obs=table.n_obs)[keep].astype(np.float32)
    sub = table[keep]
    x_counts, var = None, None
    if expression is True:
        x_counts = sub.layers[layer] if layer is not None else sub.X
        var = pd.DataFrame(index=sub.var_names.copy())
    work = AnnData(X=x_counts, obs=pd.DataFrame(index=sub.obs_names.copy()), var=var, obsm={emb_key: emb},
                   uns={emb_key: table.uns[emb_key]} if emb_key in table.uns else {})
    if isinstance(expression, str):
        work.obsm[expression] = check_matrix(sub.obsm[expression], f"obsm[{expression!r}]")
    lab_key = "_si_simulated_labels"
    n_init = n_new if n_initial is None else int(n_initial)
    rows = []
    jobs = [(s, i) for s in seeds for i in range(len(resolved))]
    init_cache: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    for seed, i in progress_bar(jobs, desc="simulate_annotation", progress=progress):
        rule_name, rule_obj = resolved[i]
        if seed not in init_cache:
            init_cache[seed] = initial_set(emb, n_init, np.random.default_rng(seed), truth=truth)
        revealed = np.zeros(len(truth), dtype=bool)
        revealed[init_cache[seed]] = True
        rng = np.random.default_rng([seed, 7919])  # same stream for every rule
        work.obs[lab_key] = pd.Series(np.where(revealed, truth, None), index=work.obs_names, dtype=object)
        model = SpotClassifier(work, lab_key, embedding_key=emb_key, expression=expression, layer=None, seed=seed)
        for r in range(1, int(n_rounds) + 1):
            model.train(max_epochs, seed=seed + r, progress=False, **(train_kwargs or {}))
            proba = model.predict_proba()
            pred = np.asarray(proba.columns, dtype=object)[proba.to_numpy().argmax(1)]
            annot = np.where(revealed, truth, pred)
            hidden = ~revealed
            rec = {"rule": rule_name, "seed": seed, "round": r, "n_labelled": int(revealed.sum())}
            rows += [
                {**rec, "metric": "weighted_f1", "value": weighted_f1(truth, pred)},
                {**rec, "metric": "misclassified_pct", "value": misclassified(truth, pred)},
                {**rec, "metric": "weighted_f1_annotation", "value": weighted_f1(truth, annot)},
                {**rec, "metric": "weighted_f1_unlabelled",
                 "value": weighted_f1(truth[hidden], pred[hidden]) if hidden.any() else np.nan},
            ]
            if r == n_rounds or not hidden.any():
                break
            chosen = _propose(rule_name, rule_obj, proba.to_numpy(), model.get_latent(), np.flatnonzero(hidden),
                              n_new, rng)
            revealed[chosen] = True
            work.obs[lab_key] = pd.Series(np.where(revealed, truth, None), index=work.obs_names, dtype=object)
    res = pd.DataFrame(rows)
    logger.info("simulate_annotation: %d runs × %d rounds on %d spots in %.1fs", len(jobs), n_rounds, len(truth),
                time.perf_counter() - t0)
    return res


def annotation_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and count over seeds per metric, rule and round of a :func:`simulate_annotation` table.

    Parameters
    ----------
    results
        Output of :func:`simulate_annotation` (several sections may be concatenated: add a
        column and group yourself, or summarise each).

    Returns
    -------
    DataFrame indexed by ``(metric, rule, round)`` with ``mean``, ``sd``, ``n`` (seeds) and the mean
    ``n_labelled``.

    Examples
    --------
    >>> import pandas as pd, stimg as si
    >>> df = pd.DataFrame({"rule": ["a", "a"], "seed": [0, 1], "round": [1, 1], "n_labelled": [5, 5],
    ...                    "metric": ["weighted_f1"] * 2, "value": [0.5, 0.7]})
    >>> round(float(si.tl.annotation_summary(df)["mean"].iloc[0]), 2)
    0.6
    """
    g = results.groupby(["metric", "rule", "round"], sort=False)["value"]
    return pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n": g.count(),
                         "n_labelled": results.groupby(["metric", "rule", "round"], sort=False)["n_labelled"].mean()})
