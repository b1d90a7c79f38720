"""SCRL rewards (hand-computed cases), the policy's log-probability and its REINFORCE update."""

from __future__ import annotations

import numpy as np
import pytest

from stimg.models._sampling._rewards import (
    RewardState,
    RewardWeights,
    cover_distance,
    coverage_reward,
    dispersion,
    normalise_coordinates,
    spatial_reward,
    type_entropy_reward,
)


def test_coverage_reward_hand_computed():
    assert coverage_reward(np.array([0, 0, 2]), 4) == 0.5
    assert coverage_reward(np.array([0, 1, 2, 3]), 4) == 1.0
    assert coverage_reward(np.array([-1, 3]), 4) == 0.25  # unknown labels ignored
    # better coverage scores higher
    assert coverage_reward(np.array([0, 1, 2]), 10) > coverage_reward(np.array([0, 0, 0]), 10)


def test_type_entropy_reward_hand_computed():
    assert type_entropy_reward(np.array([0, 1, 2, 3]), 4) == pytest.approx(1.0)
    assert type_entropy_reward(np.array([2, 2, 2]), 4) == 0.0
    assert type_entropy_reward(np.array([0, 0, 1, 1]), 4) == pytest.approx(np.log(2) / np.log(4))
    # p = (3/4, 1/4): H = -(.75 ln .75 + .25 ln .25)
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert type_entropy_reward(np.array([0, 0, 0, 1]), 2) == pytest.approx(h / np.log(2))


def test_dispersion_and_cover_distance_hand_computed():
    # |S|² normalisation, i = j pairs included (Eq. 5): (0 + 5 + 5 + 0) / 4
    assert dispersion(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(2.5)
    # pairs across sections are not counted
    assert dispersion(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([0, 1])) == 0.0
    xy = np.array([[0.0, 0.0], [0.3, 0.0], [0.9, 0.0]])
    np.testing.assert_allclose(cover_distance(xy, xy[[0]]), [0.0, 0.3, 0.9])
    np.testing.assert_allclose(cover_distance(xy, xy[[0]], cap=0.5), [0.0, 0.3, 0.5])


def test_spatial_reward_decreases_when_nearest_sample_distance_grows():
    xy = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    # one sample: dispersion 0; cover = mean distance to it
    centre = spatial_reward(xy, np.array([1]))  # cover (0.5 + 0 + 0.5) / 3
    edge = spatial_reward(xy, np.array([0]))  # cover (0 + 0.5 + 1) / 3
    assert centre == pytest.approx(-0.5 * (1 / 3))
    assert edge == pytest.approx(-0.5 * 0.5)
    assert centre > edge
    # moving a sample away from the spots it covers lowers the reward monotonically
    line = np.c_[np.linspace(0, 1, 21), np.zeros(21)]
    rewards = [spatial_reward(line, np.array([i])) for i in (10, 13, 16, 20)]
    assert all(a > b for a, b in zip(rewards, rewards[1:], strict=False))
    # spreading two samples (more dispersion, better cover) beats clumping them
    assert spatial_reward(line, np.array([5, 15])) > spatial_reward(line, np.array([9, 10]))


def test_normalise_coordinates_scales_by_tissue_size():
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 400.0], [100.0, 400.0]])
    out = normalise_coordinates(np.r_[xy, 2 * xy], np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    np.testing.assert_allclose(out[:4], out[4:] - [10.0, 0.0])  # same shape in tissue units, sections apart
    np.testing.assert_allclose(out[3], [0.5, 2.0])  # divided by sqrt(100 * 400) = 200


def test_reward_state_matches_direct_computation():
    rng = np.random.default_rng(0)
    xy = rng.uniform(size=(60, 2))
    groups = np.repeat([0, 1], 30)
    xy = normalise_coordinates(xy, groups)
    cl, ty = rng.integers(0, 5, 60), rng.integers(0, 3, 60)
    st = RewardState(xy, groups, 5, 3, RewardWeights(20, 5, 10))
    a, b = np.array([1, 7, 40]), np.array([3, 33, 50, 59])
    st.add(a, cl[a], ty[a])
    gain = st.gain(b, cl[b], ty[b])
    st.add(b, cl[b], ty[b])
    s = np.r_[a, b]
    comp = st.current()
    assert comp["sc"] == pytest.approx(coverage_reward(cl[s], 5))
    assert comp["type"] == pytest.approx(type_entropy_reward(ty[s], 3))
    assert comp["spa"] == pytest.approx(spatial_reward(xy, s, groups))
    assert comp["total"] == pytest.approx(20 * comp["sc"] + 5 * comp["type"] + 10 * comp["spa"])
    before = RewardState(xy, groups, 5, 3, RewardWeights(20, 5, 10))
    before.add(a, cl[a], ty[a])
    assert gain == pytest.approx(comp["total"] - before.current()["total"])


def test_log_prob_is_plackett_luce():
    import torch

    from stimg.models import SamplingPolicy

    pol = SamplingPolicy(2, 4, seed=0)
    emb = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=np.float32)
    avail = np.array([True, True, True, False])
    s = pol.scores(emb).astype(np.float64)
    e = np.exp(s[:3])
    expected = np.log(e[2] / e.sum()) + np.log(e[0] / (e.sum() - e[2]))
    with torch.no_grad():
        got = float(pol.log_prob(emb, avail, np.array([2, 0])))
    assert got == pytest.approx(expected, rel=1e-5)
    p = pol.probabilities(emb, avail)
    assert p[3] == 0.0 and p.sum() == pytest.approx(1.0, rel=1e-6)


def test_sample_without_replacement_respects_availability():
    from stimg.models import SamplingPolicy

    pol = SamplingPolicy(3, seed=1)
    emb = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    avail = np.ones(30, bool)
    avail[:10] = False
    pick = pol.sample(emb, avail, k=15)
    assert len(set(pick.tolist())) == 15 and pick.min() >= 10
    assert len(pol.sample(emb, avail, k=50)) == 20  # capped by what is available


def test_policy_gradient_increases_probability_of_rewarded_spots(tmp_path):
    from stimg.models import SamplingPolicy

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 4)).astype(np.float32)
    good = np.zeros(60, bool)
    good[:12] = True
    emb[good, 0] += 2.0  # rewarded spots are separable in embedding space
    avail = np.ones(60, bool)
    pol = SamplingPolicy(4, 16, lr=0.05, seed=0)
    p0 = pol.probabilities(emb, avail)[good].sum()
    for _ in range(40):
        draws = [pol.sample(emb, avail, k=5) for _ in range(8)]
        rewards = np.array([good[d].mean() for d in draws])
        pol.reinforce(emb, avail, draws, rewards)
    p1 = pol.probabilities(emb, avail)[good].sum()
    assert p0 == pytest.approx(0.2, abs=0.1)
    assert p1 > p0 + 0.3
    pol.save(tmp_path / "policy.pt")
    again = SamplingPolicy.load(tmp_path / "policy.pt")
    np.testing.assert_allclose(again.scores(emb), pol.scores(emb), rtol=1e-6)


def test_single_cell_prior_types_match_dominant_spot_type():
    import stimg as si

    spots, ref = si.datasets.synthetic(300, 40, image=False, reference=True, as_anndata=True, seed=1)
    prior = si.models.SingleCellPrior(ref, "cell_type", encoder="pca", n_clusters=8).fit(spots.var_names)
    types = prior.cell_types(spots)
    assert prior.n_types == 5 and prior.n_centroids == 8
    acc = (np.asarray(types) == spots.obs["cell_type"].astype(str).to_numpy()).mean()
    assert acc > 0.6
    # a plug-in encoder: any callable adata -> array
    plug = si.models.SingleCellPrior(ref, "cell_type", encoder=lambda a: np.log1p(a.X.toarray()), n_clusters=4)
    cl, ty = plug.fit(spots.var_names).label(plug.embed(spots))
    assert cl.max() < 4 and ty.max() < 5


def test_scvi_encoder_embeds_spots_as_queries():
    import stimg as si

    spots, ref = si.datasets.synthetic(60, 30, image=False, reference=True, as_anndata=True, n_cells=200)
    enc = si.models.ScviGeneEncoder(4, n_top_genes=None, max_epochs=2, accelerator="cpu")
    prior = si.models.SingleCellPrior(ref, "cell_type", encoder=enc, n_clusters=5, n_pcs=4).fit(spots.var_names)
    z = prior.embed(spots)
    assert z.shape == (60, 4) and np.isfinite(z).all()
    assert isinstance(enc, si.models.GeneEncoder)


def test_prior_validates_inputs():
    import stimg as si

    spots, ref = si.datasets.synthetic(20, 20, image=False, reference=True, as_anndata=True, n_cells=50)
    with pytest.raises(KeyError, match="cell_type"):
        si.models.SingleCellPrior(ref, "celltype_major")
    with pytest.raises(ValueError, match="Unknown encoder"):
        si.models.SingleCellPrior(ref, "cell_type", encoder="scgpt")
    ref.var_names = [f"other_{i}" for i in range(ref.n_vars)]
    with pytest.raises(ValueError, match="shared"):
        si.models.SingleCellPrior(ref, "cell_type", encoder="pca").fit(spots.var_names)


def test_within_batch_dispersion_exact_when_small_and_estimated_when_large():
    from stimg.models._sampling._rewards import RewardState, _pair_sum

    rng = np.random.default_rng(0)
    xy = rng.random((6000, 2))
    groups = np.zeros(len(xy), dtype=np.int64)
    st = RewardState(xy, groups, 0, 0, pair_sample=500)
    small = xy[:400]
    assert st._within_sum(small, 0) == _pair_sum(small, small)  # exact below pair_sample
    big = xy[:5000]
    exact = _pair_sum(big, big)
    est = st._within_sum(big, 0)
    assert est != exact and abs(est / exact - 1) < 0.03  # k·m distances instead of k², within 3 %
    assert st._within_sum(big, 0) == est  # deterministic for the same batch size and section


def test_policy_chunked_update_equals_whole_update():
    """Chunked forward/backward (many spots) gives the same scores and the same update as one pass."""
    from stimg.models import SamplingPolicy

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(50, 6)).astype(np.float32)
    avail = rng.random(50) > 0.2
    whole, chunked = SamplingPolicy(6, 8, lr=0.05, seed=1), SamplingPolicy(6, 8, lr=0.05, seed=1)
    chunked.chunk_size = 7  # 8 chunks, the last one partial
    np.testing.assert_allclose(chunked.scores(emb), whole.scores(emb), rtol=1e-6)
    draws = [whole.sample(emb, avail, k=6) for _ in range(4)]
    rewards = np.array([1.0, 0.2, 3.0, -1.0])
    for _ in range(3):
        lw = whole.reinforce(emb, avail, draws, rewards)
        lc = chunked.reinforce(emb, avail, draws, rewards, scores=chunked.scores(emb))  # reused scores
        assert lc == pytest.approx(lw, rel=1e-5)
    # the output bias does not change the softmax (its gradient is rounding noise, which Adam
    # scales to full steps): compare every other weight and the selection probabilities
    named_w, named_c = dict(whole.named_parameters()), dict(chunked.named_parameters())
    for name in ("net.0.weight", "net.0.bias", "net.2.weight"):
        np.testing.assert_allclose(named_c[name].detach().numpy(), named_w[name].detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked.probabilities(emb, avail), whole.probabilities(emb, avail), atol=1e-6)
    assert not np.allclose(whole.scores(emb), SamplingPolicy(6, 8, seed=1).scores(emb))  # it did learn
