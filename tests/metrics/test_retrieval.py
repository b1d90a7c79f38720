"""recall@k over the whole test set (known answers, ties, in-batch) and the batch silhouette."""

from __future__ import annotations

import numpy as np
import pytest

import stimg as si


def test_recall_known_answer_with_swapped_pair():
    n = 10
    q = np.eye(n)
    r = q.copy()
    r[[0, 1]] = r[[1, 0]]  # pairs 0 and 1 are mismatched
    res = si.metrics.recall_at_k(q, r, k=(1, 5, 10), names=("image", "gene"))
    # query 0: one candidate (r₁ = e₀) beats its partner, the other n − 2 tie with it (similarity 0):
    # P(partner in top k) = (k − 1) / (n − 1) under random tie-breaking; the 8 intact pairs are always found
    for k in (1, 5, 10):
        want = (8 + 2 * (k - 1) / (n - 1)) / n
        assert res.value(k, "image→gene") == pytest.approx(want)
        assert res.value(k, "gene→image") == pytest.approx(want)
    t = res.table.set_index(["scope", "direction", "k"])
    assert t.loc[("all", "image→gene", 5), "chance"] == pytest.approx(0.5)
    assert t.loc[("all", "image→gene", 1), "over_chance"] == pytest.approx(((8 + 0) / n) / 0.1)
    assert res.ranks["image→gene"][0] == pytest.approx(1 + (n - 2) / 2)


def test_recall_ties_are_chance_and_in_batch_matches_whole_set():
    rng = np.random.default_rng(0)
    const = np.ones((30, 4))
    res = si.metrics.recall_at_k(const, const, k=(1, 5))
    assert np.allclose(res.table["recall"], res.table["chance"])  # no information → exactly chance
    x = rng.normal(size=(40, 8))
    y = x + rng.normal(scale=1.5, size=x.shape)
    full = si.metrics.recall_at_k(x, y, k=(1, 5), in_batch=40)
    a = full.table[full.table.scope == "all"].reset_index(drop=True)
    b = full.table[full.table.scope == "in-batch 40"].reset_index(drop=True)
    np.testing.assert_allclose(a["recall"], b["recall"])  # one batch of everything = the whole set
    small = si.metrics.recall_at_k(x, y, k=(5,), in_batch=8, n_repeats=3)
    t = small.table.set_index("scope")
    assert t.loc["in-batch 8", "chance"].iloc[0] == pytest.approx(5 / 8)  # 40 = 5 batches of 8
    assert t.loc["all", "chance"].iloc[0] == pytest.approx(5 / 40)
    # in-batch recall is inflated relative to the whole test set
    assert (t.loc["in-batch 8", "recall"].to_numpy() > t.loc["all", "recall"].to_numpy()).all()


def test_recall_bad_input():
    with pytest.raises(ValueError, match="shape"):
        si.metrics.recall_at_k(np.ones((5, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        si.metrics.recall_at_k(np.full((5, 3), np.nan), np.ones((5, 3)))
    with pytest.raises(ValueError, match="k must be"):
        si.metrics.recall_at_k(np.eye(5), np.eye(5), k=0)
    with pytest.raises(ValueError, match="in_batch"):
        si.metrics.recall_at_k(np.eye(5), np.eye(5), in_batch=1)
    res = si.metrics.recall_at_k(np.eye(5), np.eye(5), k=(1,))
    with pytest.raises(KeyError, match="no recall@3"):
        res.value(3)


@pytest.mark.slow
def test_silhouette_batch_matches_scib_definition():
    """scIB's rescaled ASW-batch with one label: mean over spots of 1 − |silhouette by batch| (one jax call)."""
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    b = np.repeat(["s1", "s2"], 60)
    x[:60] += 1.5  # partly separated sections
    got = si.metrics.silhouette_batch(x, b, metric="euclidean")
    want = float(np.mean(1 - np.abs(silhouette_samples(x, b))))
    assert got == pytest.approx(want, abs=1e-4)
    assert 0.3 < got < 0.95
    with pytest.raises(ValueError, match="at least 2 batches"):
        si.metrics.silhouette_batch(x, ["s1"] * 120)
    with pytest.raises(ValueError, match="metric"):
        si.metrics.silhouette_batch(x, b, metric="manhattan")


def test_recall_plot_has_chance_line():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    res = si.metrics.recall_at_k(x, x + rng.normal(size=x.shape), k=(1, 5, 10), names=("image", "gene"), in_batch=16)
    ax = si.pl.recall(res, scopes=["all", "in-batch 16"])
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert "chance" in labels and any("in-batch 16" in lb for lb in labels)
    chance = next(ln for ln in ax.get_lines() if ln.get_label() == "chance")
    np.testing.assert_allclose(chance.get_ydata(), [1 / 50, 5 / 50, 10 / 50])
    with pytest.raises(KeyError, match="nothing to plot"):
        si.pl.recall(res, scopes=["in-batch 64"])
    import matplotlib.pyplot as plt

    plt.close("all")
