import numpy as np
import pytest

import stimg as si


def test_choose_context_uses_training_sections_only_and_records_choice():
    adata = si.datasets.synthetic(100, 12, n_sections=4, image=False, as_anndata=True, seed=5)
    libs = adata.obs["library_id"].to_numpy()
    train = libs != "S3"
    adata.var["si_target"] = True
    x = adata.obsm["X_synthetic"]  # noisy features: pooling neighbours denoises them
    adata.obsm["X_noisy"] = x + x.std() * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    before = adata.copy()
    # the held-out section's counts must not matter: scramble them
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X).copy()
    X[~train] = np.random.default_rng(0).permutation(X[~train])
    adata.X = X
    res = si.tl.choose_spatial_context(adata, "X_noisy", candidates=[0, 250, (250, 450)], train_indices=train,
                                       n_components=8, key_added="ctx")
    assert list(res["context"]) == ["0 µm", "250 µm", "250+450 µm"]
    assert {"pcc_S0", "pcc_S1", "pcc_S2"} <= set(res.columns) and "pcc_S3" not in res.columns
    assert res["chosen"].sum() == 1
    # expression varies smoothly in space and the features are noisy: context beats none
    assert res.loc[res.chosen, "context"].iloc[0] != "0 µm"
    assert res["mean_pcc"].max() > res.loc[res.context == "0 µm", "mean_pcc"].iloc[0]
    p = adata.uns["ctx"]["params"]
    assert p["selection"]["chosen"] == res.loc[res.chosen, "context"].iloc[0]
    assert p["selection"]["cv"] == "LeaveOneGroupOut"
    np.testing.assert_allclose(adata.obsm["ctx"], si.pp.spatial_context(before, "X_noisy", radius_um=p["radius_um"],
                                                                        inplace=False))
    res2 = si.tl.choose_spatial_context(before, "X_noisy", candidates=[0, 250, (250, 450)], train_indices=train,
                                        n_components=8, inplace=False)
    np.testing.assert_allclose(res2["mean_pcc"], res["mean_pcc"])  # test-section counts played no part
    assert "X_noisy_context" not in before.obsm


def test_choose_context_needs_two_sections():
    adata = si.datasets.synthetic(64, 5, n_sections=1, image=False, as_anndata=True)
    with pytest.raises(ValueError, match="at least 2"):
        si.tl.choose_spatial_context(adata, "X_synthetic", genes=list(adata.var_names))
