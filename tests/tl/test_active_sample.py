"""si.tl.active_sample, si.tl.simulate_sampling and si.pl.sampling_curve on small synthetic data."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import stimg as si


@pytest.fixture
def two_sections():
    adata, ref = si.datasets.synthetic(150, 25, n_sections=2, image=False, reference=True, as_anndata=True,
                                       n_cells=400, seed=3)
    return adata, ref


def test_defaults_run_with_expression_fallback(two_sections, caplog):
    adata, _ = two_sections
    logging.getLogger("stimg").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="stimg"):
            si.tl.active_sample(adata, n_rounds=5)
    finally:
        logging.getLogger("stimg").removeHandler(caplog.handler)
    assert "no single-cell reference" in caplog.text
    obs = adata.obs
    assert obs["si_sampled"].dtype == bool and obs["si_sampled"].sum() == 30  # 10 % of 300
    assert set(obs.loc[~obs["si_sampled"], "si_sample_round"]) == {-1}
    assert sorted(obs.loc[obs["si_sampled"], "si_sample_round"].unique()) == [0, 1, 2, 3, 4]
    # spots from both sections
    assert obs.loc[obs["si_sampled"], "library_id"].nunique() == 2
    uns = adata.uns["si_sampled"]
    assert uns["params"]["method"] == "scrl" and uns["params"]["embedding_key"] == "X_synthetic"
    assert uns["params"]["reward_source"] == "own expression clusters"
    rounds = uns["rounds"]
    assert list(rounds["round"]) == [0, 1, 2, 3, 4]
    assert {"R_sc", "R_type", "R_spa", "reward", "gain"} <= set(rounds.columns)
    assert rounds["n_sampled"].iloc[-1] == 30


@pytest.mark.parametrize("method", ["random", "grid", "kmeans", "diversity", "uncertainty"])
def test_baselines_spend_exact_budget(two_sections, method):
    adata, _ = two_sections
    out = si.tl.active_sample(adata, 24, method=method, n_rounds=3, seed=1, inplace=False)
    assert "si_sampled" not in adata.obs  # inplace=False writes nothing
    assert out["si_sampled"].sum() == 24
    assert (out.loc[out["si_sampled"], "si_sample_round"] >= 0).all()
    assert (out.loc[~out["si_sampled"], "si_sample_round"] == -1).all()


def test_grid_is_spatially_uniform(two_sections):
    adata, _ = two_sections
    from scipy.spatial import cKDTree

    xy = adata.obsm["spatial"]
    lib = adata.obs["library_id"].to_numpy()

    def cover(mask):
        d = [cKDTree(xy[mask & (lib == s)]).query(xy[lib == s])[0].mean() for s in np.unique(lib)]
        return float(np.mean(d))

    grid = si.tl.active_sample(adata, 30, method="grid", inplace=False)["si_sampled"].to_numpy()
    rand = [si.tl.active_sample(adata, 30, method="random", seed=s, inplace=False)["si_sampled"].to_numpy()
            for s in range(5)]
    assert (lib[grid] == "S0").sum() == 15  # budget split by section size
    assert cover(grid) < min(cover(r) for r in rand)


def test_scrl_with_reference_beats_random_on_its_reward(two_sections):
    adata, ref = two_sections
    from stimg.models._sampling._rewards import RewardState, RewardWeights, normalise_coordinates

    prior = si.models.SingleCellPrior(ref, "cell_type", encoder="pca", n_clusters=10).fit(adata.var_names)
    si.tl.active_sample(adata, 0.1, prior=prior, n_rounds=6, seed=0)
    assert adata.uns["si_sampled"]["params"]["reward_source"] == "single-cell reference"
    cl, ty = prior.label(prior.embed(adata))
    groups = adata.obs["library_id"].cat.codes.to_numpy()
    xy = normalise_coordinates(adata.obsm["spatial"], groups)

    def reward(mask):
        st = RewardState(xy, groups, prior.n_centroids, prior.n_types, RewardWeights())
        idx = np.flatnonzero(mask)
        st.add(idx, cl[idx], ty[idx])
        return st.current()["total"]

    r_scrl = reward(adata.obs["si_sampled"].to_numpy())
    assert r_scrl == pytest.approx(adata.uns["si_sampled"]["rounds"]["reward"].iloc[-1])
    r_rand = [reward(si.tl.active_sample(adata, 0.1, method="random", seed=s, inplace=False)["si_sampled"])
              for s in range(5)]
    assert r_scrl > np.mean(r_rand)


def test_propose_mode_returns_next_batch(two_sections):
    adata, ref = two_sections
    first = si.tl.active_sample(adata, 20, method="random", seed=0, inplace=False)
    adata.obs["measured"] = first["si_sampled"].to_numpy()
    adata.obs["si_sample_round"] = first["si_sample_round"].to_numpy()
    si.tl.active_sample(adata, 10, mode="propose", sampled_key="measured", reference=ref, cell_type_key="cell_type",
                        encoder="pca", n_rounds=3)
    obs = adata.obs
    new = obs["si_sampled"] & ~obs["measured"]
    assert new.sum() == 10 and obs["si_sampled"].sum() == 30
    assert (obs.loc[new, "si_sample_round"] == 1).all()
    assert (obs.loc[obs["measured"], "si_sample_round"] == 0).all()
    out = si.tl.active_sample(adata, 5, method="kmeans", mode="propose", sampled_key="measured", inplace=False)
    assert out.loc[adata.obs["measured"].to_numpy(), "si_sampled"].all()  # measured spots stay sampled
    assert (out["si_sampled"] & ~adata.obs["measured"]).sum() == 5


def test_validation_writes_nothing(two_sections):
    adata, _ = two_sections
    with pytest.raises(ValueError, match="empty"):
        si.tl.active_sample(adata, 0)
    with pytest.raises(ValueError, match="exceeds"):
        si.tl.active_sample(adata, 301)
    with pytest.raises(ValueError, match="Unknown method"):
        si.tl.active_sample(adata, method="best")
    with pytest.raises(KeyError, match="X_synthetic"):
        si.tl.active_sample(adata, embedding_key="X_uni")
    with pytest.raises(ValueError, match="sampled_key"):
        si.tl.active_sample(adata, mode="propose")
    bad = adata.copy()
    bad.obsm["X_synthetic"][3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        si.tl.active_sample(bad, method="random")
    assert "si_sampled" not in bad.obs and "si_sampled" not in bad.uns
    assert "si_sampled" not in adata.obs


def test_simulate_sampling_tidy_table_and_curve(two_sections):
    adata, _ = two_sections
    res = si.tl.simulate_sampling(adata, ["random", "grid"], [0.2, 1.0], test="S1", seeds=[0, 1], n_genes=10)
    assert list(res.columns) == ["method", "budget", "seed", "metric", "value"]
    assert len(res) == 2 * 2 * 2 * 3
    full = res[(res["budget"] == 1.0) & (res["metric"] == "pcc")]["value"]
    assert np.allclose(full, full.iloc[0])  # all pool spots: every method trains the same model
    pcc = res[res["metric"] == "pcc"]["value"]
    assert pcc.between(-1, 1).all() and pcc.mean() > 0.2
    summ = res.attrs["summary"]
    assert summ.loc[("pcc", "random", 0.2), "n"] == 2
    ax = si.pl.sampling_curve(res, metric="pcc")
    assert len(ax.containers) == 2 and ax.get_legend() is not None
    with pytest.raises(KeyError, match="Available"):
        si.pl.sampling_curve(res, metric="r2")
    with pytest.raises(KeyError, match="sections"):
        si.tl.simulate_sampling(adata, ["random"], [0.5], test="S9")
    assert isinstance(res, pd.DataFrame) and "si_sampled" not in adata.obs
