"""si.tl.annotate / simulate_annotation / predict_annotation, selection rules, annotation plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import stimg as si
from stimg.tl import SelectionContext, UncertaintyRule, entropy, least_confidence, margin
from stimg.tl._annotate import initial_set


@pytest.fixture
def adata():
    return si.datasets.synthetic(240, 30, image=False, as_anndata=True, seed=2)


def _snapshot(ad):
    return (list(ad.obs.columns), ad.obs.copy(), sorted(ad.obsm.keys()), sorted(ad.uns.keys()))


# ----------------------------------------------------------------------------- selection rules
def test_scores_on_a_constructed_case():
    p = np.array([[0.40, 0.40, 0.20],   # tie at the top: margin's favourite
                  [0.34, 0.33, 0.33],   # near uniform: least-confidence's and entropy's favourite
                  [0.90, 0.05, 0.05]])  # confident
    np.testing.assert_allclose(least_confidence(p), [0.9, 0.99, 0.15], atol=1e-9)
    np.testing.assert_allclose(margin(p), [1.0, 0.99, 0.15], atol=1e-9)
    assert np.argmax(entropy(p)) == 1 and entropy(p)[2] < 0.5
    np.testing.assert_allclose(entropy(np.full((1, 4), 0.25)), [1.0])
    ctx = SelectionContext(np.arange(3), p, np.eye(3))
    rng = np.random.default_rng(0)
    assert UncertaintyRule(margin, diverse=False).select(ctx, 1, rng).tolist() == [0]
    assert UncertaintyRule(least_confidence, diverse=False).select(ctx, 1, rng).tolist() == [1]
    assert UncertaintyRule(entropy, diverse=False).select(ctx, 1, rng).tolist() == [1]


def test_least_confidence_is_diverse_within_the_uncertain_pool():
    rng = np.random.default_rng(0)
    n = 400
    feats = np.r_[rng.normal(0, 0.05, (200, 2)), rng.normal(5, 0.05, (200, 2))]
    conf = np.full(n, 0.95)
    conf[:30] = 0.55  # the 30 most uncertain spots sit in group A
    conf[200:204] = 0.60  # group B has a few slightly less uncertain ones
    p = np.c_[conf, 1 - conf]
    ctx = SelectionContext(np.arange(n), p, feats)
    top = UncertaintyRule(least_confidence, diverse=False).select(ctx, 2, rng)
    assert (top < 200).all()  # pure uncertainty: both from group A
    div = UncertaintyRule(least_confidence, top_fraction=0.1).select(ctx, 2, rng)  # pool of 40 spans both groups
    assert sorted(np.asarray(div) >= 200) == [False, True]


def test_small_pool_falls_back_to_the_most_uncertain_and_pool_factor_forces_clustering():
    rng = np.random.default_rng(3)
    n = 200  # at most 20 · n_new unlabelled: the top 5 % (10 spots) is smaller than n_new
    feats = np.r_[rng.normal(0, 0.05, (100, 2)), rng.normal(5, 0.05, (100, 2))]
    conf = np.full(n, 0.95)
    conf[:12] = np.linspace(0.5, 0.6, 12)  # the 12 most uncertain spots sit in group A
    conf[100:112] = 0.7  # group B: the next most uncertain
    ctx = SelectionContext(np.arange(n), np.c_[conf, 1 - conf], feats)
    default = si.tl._annotation_rules.get_rule("least_confidence")[1]
    got = default.select(ctx, 12, np.random.default_rng(0))
    assert sorted(got.tolist()) == list(range(12))  # exactly the 12 most uncertain, no clustering
    wide = UncertaintyRule(least_confidence, pool_factor=2).select(ctx, 12, np.random.default_rng(0))
    assert (np.asarray(wide) >= 100).any() and (np.asarray(wide) < 100).any()  # pool of 24 spans both groups
    with pytest.raises(ValueError, match="pool_factor"):
        UncertaintyRule(least_confidence, pool_factor=0.5)


def test_rules_only_choose_unlabelled_spots_and_registry_checks():
    p = np.random.default_rng(1).dirichlet([1, 1, 1], 100)
    cand = np.arange(50, 100)
    ctx = SelectionContext(cand, p, np.random.default_rng(2).normal(size=(100, 4)))
    for name in si.tl.annotation_rules():
        _, rule = si.tl._annotation_rules.get_rule(name)
        got = np.asarray(rule.select(ctx, 10, np.random.default_rng(0)))
        assert len(set(got.tolist())) == 10 and np.isin(got, cand).all(), name
    r1 = si.tl.RandomRule().select(ctx, 10, np.random.default_rng(5))
    r2 = si.tl.RandomRule().select(ctx, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(r1, r2)
    with pytest.raises(ValueError, match="Unknown annotation rule 'nope'"):
        si.tl.annotate(si.datasets.synthetic(20, 5, image=False, as_anndata=True), "lab", rule="nope")
    with pytest.raises(ValueError, match="exists"):
        si.tl.register_annotation_rule("random", si.tl.RandomRule())
    with pytest.raises(TypeError, match="AnnotationRule"):
        si.tl.register_annotation_rule("fn", lambda ctx, n, rng: ctx.candidates[:n])


# ----------------------------------------------------------------------------- first round
def test_initial_set_adds_one_spot_of_each_missed_class():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 6)).astype(np.float32)
    truth = np.array(["common"] * 297 + ["rare_a", "rare_b", "rare_c"], dtype=object)
    picks = initial_set(feats, 10, np.random.default_rng(0), truth=truth)
    assert len(set(picks.tolist())) == len(picks)
    assert set(truth[picks]) == {"common", "rare_a", "rare_b", "rare_c"}
    assert len(initial_set(feats, 10, np.random.default_rng(0))) == 10  # without labels: k-means only


def test_annotation_rounds_write_and_warm_start(adata):
    res0 = si.tl.annotate(adata, "pathologist", n_new=30, seed=0)
    assert res0.round == 0 and res0.model is None and len(res0.to_label) == 30
    assert adata.obs["si_to_label"].sum() == 30 and "si_annotation" not in adata.obs
    # the pathologist labels the proposed spots (missing value = unlabelled)
    truth = adata.obs["cell_type"].astype(str)
    adata.obs["pathologist"] = truth.where(adata.obs["si_to_label"])
    res1 = si.tl.annotate(adata, "pathologist", n_new=30, model=res0.model, seed=0)
    m = res1.model
    assert m.n_rounds_ == 1
    labelled = adata.obs["pathologist"].notna()
    assert not (adata.obs["si_to_label"] & labelled).any()  # proposals are unlabelled spots
    assert adata.obs["si_to_label"].sum() == 30
    ann = adata.obs["si_annotation"]
    assert isinstance(ann.dtype, pd.CategoricalDtype)
    assert (ann[labelled].astype(str) == adata.obs.loc[labelled, "pathologist"]).all()  # labels win
    proba = adata.obsm["si_annotation_proba"]
    assert list(proba.columns) == m.classes_ and (proba.index == adata.obs_names).all()
    conf = adata.obs["si_annotation_confidence"]
    assert ((conf > 0) & (conf <= 1)).all()
    unl = ~labelled.to_numpy()
    np.testing.assert_allclose(conf.to_numpy()[unl], proba.to_numpy()[unl].max(1), rtol=1e-6)
    # second labelling round: warm start of the same model
    adata.obs["pathologist"] = truth.where(adata.obs["si_to_label"] | labelled)
    res2 = si.tl.annotate(adata, "pathologist", n_new=30, model=m, seed=0)
    assert res2.model is m and m.n_rounds_ == 2 and res2.round == 2
    hist = adata.uns["si_annotation"]["history"]
    assert hist["round"].tolist() == [0, 1, 2] and hist["n_labelled"].tolist() == [0, 30, 60]
    assert adata.uns["si_annotation"]["params"]["rule"] == "least_confidence"
    acc = (adata.obs["si_annotation"].astype(str) == truth).mean()
    assert acc > 0.6


def test_train_kwargs_reach_the_classifier(adata):
    truth = adata.obs["cell_type"].astype(str)
    adata.obs["pathologist"] = truth.where(pd.Series(np.arange(adata.n_obs) % 3 == 0, index=adata.obs_names))
    res = si.tl.annotate(adata, "pathologist", n_new=10, seed=0, max_epochs=5,
                         train_kwargs={"validation_size": 0.2, "class_weight": None})
    h = res.model.history_[-1]
    assert h["n_validation"] > 0 and h["n_train"] + h["n_validation"] == 80 and h["epochs"] == 5
    assert set(res.model.class_weights_[res.model.class_weights_ > 0]) == {1.0}


def test_nothing_written_on_failure(adata):
    adata.obs["pathologist"] = adata.obs["cell_type"].astype(str).where(np.arange(adata.n_obs) % 4 == 0)
    before = _snapshot(adata)

    def unchanged():
        after = _snapshot(adata)
        assert before[0] == after[0] and before[2:] == after[2:]
        pd.testing.assert_frame_equal(before[1], after[1])

    with pytest.raises(ValueError, match="lr > 0"):  # training fails after the labels were read
        si.tl.annotate(adata, "pathologist", n_new=10, train_kwargs={"lr": -1.0})
    unchanged()
    emb = adata.obsm["X_synthetic"].copy()
    adata.obsm["X_synthetic"][3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        si.tl.annotate(adata, "pathologist", n_new=10)
    adata.obsm["X_synthetic"] = emb
    unchanged()
    adata.obs["pathologist"] = adata.obs["pathologist"].astype(object)
    adata.obs.loc[adata.obs_names[1:20], "pathologist"] = ""
    with pytest.raises(ValueError, match="missing value"):
        si.tl.annotate(adata, "pathologist", n_new=10)
    # a user's own column is never overwritten
    ad2 = si.datasets.synthetic(60, 5, image=False, as_anndata=True)
    ad2.obs["si_to_label"] = "mine"
    with pytest.raises(ValueError, match="not written by stimg"):
        si.tl.annotate(ad2, "pathologist", n_new=5)
    assert (ad2.obs["si_to_label"] == "mine").all()
    with pytest.raises(ValueError, match="n_new"):
        si.tl.annotate(ad2, "pathologist", n_new=0)


def test_prelabelled_single_class_joins_the_initial_set(adata):
    adata.obs["pathologist"] = pd.Series([None] * adata.n_obs, index=adata.obs_names, dtype=object)
    adata.obs.loc[adata.obs_names[:3], "pathologist"] = "rare class"
    res = si.tl.annotate(adata, "pathologist", n_new=12)
    assert res.model is None and res.rule.startswith("kmeans")
    assert not adata.obs["si_to_label"].iloc[:3].any() and adata.obs["si_to_label"].sum() == 12


def test_inplace_false_returns_the_round_and_writes_nothing(adata):
    adata.obs["pathologist"] = adata.obs["cell_type"].astype(str).where(np.arange(adata.n_obs) % 4 == 0)
    before = _snapshot(adata)
    res = si.tl.annotate(adata, "pathologist", n_new=15, rule="margin", inplace=False, max_epochs=10)
    assert _snapshot(adata)[2:] == before[2:] and list(adata.obs.columns) == before[0]
    assert len(res.to_label) == 15 and res.proba.shape[0] == adata.n_obs and res.rule == "margin"
    assert "AnnotationRound(round=0" in repr(res)


# ----------------------------------------------------------------------------- simulation
def test_simulate_annotation_returns_the_tidy_frame(adata):
    res = si.tl.simulate_annotation(adata, "cell_type", rules=["least_confidence", "entropy", "random"], n_rounds=3,
                                    n_new=20, seeds=[0, 1], max_epochs=10)
    assert list(res.columns) == ["rule", "seed", "round", "n_labelled", "metric", "value"]
    assert set(res["metric"]) == {"weighted_f1", "misclassified_pct", "weighted_f1_annotation",
                                  "weighted_f1_unlabelled"}
    assert len(res) == 3 * 2 * 3 * 4
    f1 = res[res["metric"] == "weighted_f1"]
    r1 = f1[f1["round"] == 1].groupby("seed")["value"].nunique()
    assert (r1 == 1).all()  # round 1 = the shared initial set: every rule agrees
    nl = f1[(f1["rule"] == "random") & (f1["seed"] == 0)]["n_labelled"].tolist()
    assert nl[1] - nl[0] == 20 and nl[2] - nl[1] == 20
    assert res["value"].between(0, 100).all()
    mis = res[res["metric"] == "misclassified_pct"]["value"].to_numpy()
    np.testing.assert_array_less(-1e-9, mis)
    summary = si.tl.annotation_summary(res)
    assert {"mean", "sd", "n"} <= set(summary.columns)
    assert summary.loc[("weighted_f1", "random", 1), "n"] == 2
    both = pd.concat([res.assign(section="a"), res.assign(section="b")])  # per-section results concatenate
    assert len(both) == 2 * len(res)
    assert "cell_type" in adata.obs and "si_annotation" not in adata.obs  # nothing written
    ax = si.pl.annotation_curve(res, metric="weighted_f1")
    assert len(ax.get_legend().get_texts()) == 3
    ax = si.pl.annotation_curve(res, metric="misclassified_pct", x="n_labelled", rules=["random"])
    ax = si.pl.annotation_curve(res, capsize=0, marker="s")  # user styles override the defaults
    assert ax.lines[0].get_marker() == "s"
    with pytest.raises(KeyError, match="not in results"):
        si.pl.annotation_curve(res, rules=["margin"])


def test_weighted_f1_and_misclassified():
    assert si.metrics.weighted_f1(["a", "b"], ["a", "b"]) == 1.0
    assert si.metrics.misclassified(["a", "b", "b", "b"], ["a", "b", "a", "a"]) == 50.0
    from sklearn.metrics import f1_score

    t = ["a", "a", "a", "b", "c", "c"]
    p = ["a", "b", "a", "b", "a", "c"]
    assert si.metrics.weighted_f1(t, p) == pytest.approx(f1_score(t, p, average="weighted"))
    with pytest.raises(ValueError, match="missing labels"):
        si.metrics.weighted_f1(["a", None], ["a", "b"])


def test_confusion_matrix_plot():
    ad = si.datasets.synthetic(8, 5, image=False, as_anndata=True)
    ad.obs["truth"] = ["a", "a", "a", "b", "b", "c", "c", None]
    ad.obs["pred"] = ["a", "a", "b", "b", "b", "c", "a", "a"]
    ax = si.pl.confusion(ad, "truth", "pred", normalize=None)
    cm = ax.confusion_
    assert list(cm.index) == ["a", "b", "c"] and int(cm.to_numpy().sum()) == 7
    assert cm.loc["a", "b"] == 1 and cm.loc["c", "a"] == 1 and cm.loc["b", "b"] == 2
    ax = si.pl.confusion(ad, "truth", "pred")
    np.testing.assert_allclose(ax.confusion_.sum(1), 1.0)


# ----------------------------------------------------------------------------- transfer
def test_transfer_to_another_section_with_harmony():
    ad = si.datasets.synthetic(200, 40, n_sections=2, image=False, as_anndata=True, seed=4)
    ad.obs["truth"] = ad.obs["cell_type"].astype(str)
    si.pp.integrate_expression(ad, n_top_genes=40, n_comps=10)
    assert ad.obsm["X_harmony"].shape == (400, 10) and len(ad.uns["X_harmony"]["params"]["genes"]) == 40
    src = ad[ad.obs["library_id"] == "S0"].copy()
    dst = ad[ad.obs["library_id"] == "S1"].copy()
    src.obs["pathologist"] = src.obs["truth"]
    model = si.models.SpotClassifier(src, "pathologist", embedding_key="X_synthetic", expression="X_harmony", seed=0)
    model.train(max_epochs=30, progress=False)
    si.tl.predict_annotation(dst, model)
    acc = (dst.obs["si_annotation"].astype(str) == dst.obs["truth"]).mean()
    majority = dst.obs["truth"].value_counts(normalize=True).iloc[0]
    assert acc > majority + 0.1, (acc, majority)
    assert dst.uns["si_annotation"]["params"]["function"] == "predict_annotation"
    # transferred model starts the annotation of the new section: predictions + uncertain spots
    res = si.tl.annotate(dst, "pathologist", n_new=10, model=model)
    assert res.model is not model and model.adata is src and len(res.to_label) == 10
    with pytest.raises(ValueError, match="at least 2 sections"):
        si.pp.integrate_expression(src)
