"""si.models.SpotClassifier: training, warm start, class weights, persistence, transfer checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import stimg as si
from stimg.models._classifier import class_weights


@pytest.fixture
def adata():
    ad = si.datasets.synthetic(300, 30, image=False, as_anndata=True, seed=1)
    truth = ad.obs["cell_type"].astype(str).to_numpy()
    lab = np.full(ad.n_obs, None, dtype=object)
    rng = np.random.default_rng(0)
    idx = rng.choice(ad.n_obs, 120, replace=False)
    lab[idx] = truth[idx]
    ad.obs["label"] = lab
    ad.obs["truth"] = truth
    return ad


def test_trains_fast_and_predicts_unlabelled_spots(adata):
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", seed=0)
    m.train(max_epochs=40, progress=False)
    proba = m.predict_proba()
    assert proba.shape == (adata.n_obs, len(m.classes_))
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    pred = m.predict()
    hidden = adata.obs["label"].isna().to_numpy()
    acc = (pred.astype(str).to_numpy()[hidden] == adata.obs["truth"].to_numpy()[hidden]).mean()
    majority = adata.obs["truth"].value_counts(normalize=True).iloc[0]
    assert acc > majority + 0.1, (acc, majority)
    assert m.get_latent().shape == (adata.n_obs, 128)
    assert m.is_trained_ and m.n_rounds_ == 1 and m.history_[0]["n_train"] == 120
    assert m.history_[0]["seconds"] < 20  # CPU seconds, not minutes


def test_warm_start_continues_from_previous_weights(adata):
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", seed=0)
    m.train(max_epochs=20, progress=False)
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    m.train(max_epochs=1, lr=1e-9, progress=False)  # warm: almost no change
    drift = max(float((m.module.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert drift < 1e-5
    m.train(max_epochs=1, lr=1e-9, warm_start=False, progress=False)  # re-initialised
    drift = max(float((m.module.state_dict()[k] - v).abs().max()) for k, v in before.items()
                if "mean" not in k and "scale" not in k)
    assert drift > 1e-2
    assert m.n_rounds_ == 3


def test_new_class_grows_output_and_keeps_old_rows(adata):
    lab = adata.obs["label"].to_numpy().copy()
    rare = "type_4"
    first = np.where(lab == rare, None, lab)
    adata.obs["label"] = first
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", seed=0)
    m.train(max_epochs=5, progress=False)
    assert rare not in m.classes_
    w_old = m.module.out.weight.detach().clone()
    adata.obs["label"] = lab
    m.train(max_epochs=1, lr=1e-9, progress=False)
    assert m.classes_[-1] == rare and m.module.n_classes == len(m.classes_)
    torch.testing.assert_close(m.module.out.weight[: w_old.shape[0]], w_old, atol=1e-6, rtol=0)
    assert list(m.predict_proba().columns) == m.classes_


def test_class_weights_are_inverse_frequencies_recomputed_each_round(adata):
    np.testing.assert_allclose(class_weights(np.array([0, 0, 0, 1]), 3), [4 / 6, 2.0, 0.0])
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", seed=0)
    m.train(max_epochs=2, progress=False)

    def expected():
        y = adata.obs["label"].dropna().astype(str)
        counts = y.value_counts().reindex(m.classes_).fillna(0).to_numpy()
        return np.where(counts > 0, counts.sum() / ((counts > 0).sum() * np.maximum(counts, 1)), 0.0)

    np.testing.assert_allclose(m.class_weights_, expected(), rtol=1e-5)
    w1 = m.class_weights_.copy()
    lab = adata.obs["label"].to_numpy().copy()
    lab[np.flatnonzero(pd.isna(lab))[:60]] = "type_1"  # many more of one class
    adata.obs["label"] = lab
    m.train(max_epochs=1, progress=False)
    np.testing.assert_allclose(m.class_weights_, expected(), rtol=1e-5)
    assert not np.allclose(w1, m.class_weights_)


def test_class_weights_help_the_rare_class():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (190, 8)), rng.normal(1.2, 1, (10, 8))].astype(np.float32)
    y = np.array(["common"] * 190 + ["rare"] * 10, dtype=object)
    ad = si.datasets.synthetic(200, 5, image=False, as_anndata=True)
    ad.obsm["X_f"] = x
    ad.obs["y"] = y
    m = si.models.SpotClassifier(ad, "y", embedding_key="X_f", seed=0)
    m.train(max_epochs=30, progress=False)
    recall_rare = (m.predict().astype(str).to_numpy()[190:] == "rare").mean()
    assert recall_rare >= 0.8


def test_bad_labels_and_indices_are_refused(adata):
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic")
    with pytest.raises(ValueError, match="have no label"):
        m.train(max_epochs=1, train_indices=np.arange(adata.n_obs), progress=False)
    lab = adata.obs["label"].to_numpy().copy()
    lab[pd.isna(lab)] = ""
    adata.obs["label"] = lab
    with pytest.raises(ValueError, match="empty-string labels"):
        m.train(max_epochs=1, progress=False)
    adata.obs["label"] = np.where(pd.Series(lab).eq("").to_numpy(), None, "one class")
    with pytest.raises(ValueError, match="single class"):
        m.train(max_epochs=1, progress=False)
    with pytest.raises(RuntimeError, match="not trained"):
        m.predict()
    with pytest.raises(ValueError, match="embedding_key"):
        si.models.SpotClassifier(adata, "label")


def test_save_load_round_trip_with_expression_branch(adata, tmp_path):
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", expression=True, n_hvg=20, seed=3)
    m.train(max_epochs=5, progress=False)
    assert len(m.expression_["genes"]) == 20
    path = m.save(tmp_path / "clf.stimg")
    back = si.models.load_model(path, adata)
    assert isinstance(back, si.models.SpotClassifier)
    pd.testing.assert_frame_equal(back.predict_proba(), m.predict_proba())
    assert back.classes_ == m.classes_ and back.history_ == m.history_
    no_table = si.models.SpotClassifier.load(path)
    pd.testing.assert_frame_equal(no_table.predict_proba(adata), m.predict_proba())
    with pytest.raises(ValueError, match="no table attached"):
        no_table.predict()


def test_other_section_needs_matching_features(adata):
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", expression="cell_type_fractions")
    m.train(max_epochs=2, progress=False)
    other = adata.copy()
    other.obsm["X_synthetic"] = other.obsm["X_synthetic"][:, :5]
    with pytest.raises(ValueError, match="features but the model was trained on"):
        m.predict(other)
    other = adata.copy()
    del other.obsm["cell_type_fractions"]
    with pytest.raises(KeyError, match="integrate_expression"):
        m.predict(other)
    copy = m.attach(adata.copy())
    copy.train(max_epochs=1, progress=False)
    assert m.n_rounds_ == 1 and copy.n_rounds_ == 2  # the original is untouched


def test_provenance_is_checked_for_a_new_slide(adata, tmp_path):
    adata.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "encoder_identity": "abc", "patch_um": 112.0,
                                           "patch_px": 224}}
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic")
    m.train(max_epochs=2, progress=False)
    loaded = si.models.SpotClassifier.load(m.save(tmp_path / "m.stimg"))
    other = adata.copy()
    other.uns["X_synthetic"]["params"]["encoder"] = "uni"
    with pytest.raises(ValueError, match="encoder='uni'.*trained with encoder='synthetic'"):
        loaded.predict(other)
    other.uns["X_synthetic"]["params"]["encoder"] = "synthetic"
    assert len(loaded.predict(other)) == adata.n_obs


def test_stratified_holdout_keeps_every_class_in_training():
    from stimg.models._classifier import stratified_holdout

    y = np.array([0] * 20 + [1] * 5 + [2] * 2)
    fit, val = stratified_holdout(y, 0.1, seed=0)
    assert np.intersect1d(fit, val).size == 0 and np.union1d(fit, val).size == y.size
    assert np.bincount(y[val]).tolist() == [2, 1, 1]  # ceil(0.1 · n_k), at least one per class
    assert set(y[fit]) == {0, 1, 2}
    assert stratified_holdout(y, 0.1, seed=0)[1].tolist() == val.tolist()  # seeded
    assert stratified_holdout(np.array([0, 0, 1]), 0.1, seed=0)[1].size == 0  # a class with one spot: no hold-out
    assert stratified_holdout(y, 0.0, seed=0)[1].size == 0


def test_validation_size_keeps_the_best_validation_epoch(adata):
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", seed=0)
    m.train(max_epochs=30, validation_size=0.2, progress=False)
    h = m.history_[-1]
    n_lab = int(adata.obs["label"].notna().sum())
    assert h["n_validation"] == m.validation_indices_.size > 0 and h["n_train"] + h["n_validation"] == n_lab
    assert 1 <= h["best_epoch"] <= 30
    # the kept weights are those of the best epoch: their validation loss is the recorded minimum
    from torch import nn

    rows = m.validation_indices_
    y = torch.as_tensor([m.classes_.index(c) for c in adata.obs["label"].to_numpy()[rows]])
    x = torch.as_tensor(adata.obsm["X_synthetic"][rows], dtype=torch.float32)
    with torch.no_grad():
        loss = nn.CrossEntropyLoss(weight=torch.as_tensor(m.class_weights_))(m.module(x), y)
    assert float(loss) == pytest.approx(h["validation_loss"], rel=1e-4)
    # 0: no hold-out, all labelled spots trained on, final weights
    m.train(max_epochs=5, progress=False)
    assert m.history_[-1]["n_validation"] == 0 and m.history_[-1]["n_train"] == n_lab
    with pytest.raises(ValueError, match="validation_size"):
        m.train(max_epochs=1, validation_size=0.9, progress=False)


def test_class_weight_none_is_plain_cross_entropy(adata):
    y = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(class_weights(y, 4, balanced=False), [1, 1, 1, 0])
    m = si.models.SpotClassifier(adata, "label", embedding_key="X_synthetic", seed=0)
    m.train(max_epochs=2, class_weight=None, progress=False)
    present = m.class_weights_ > 0
    np.testing.assert_array_equal(m.class_weights_[present], 1.0)
    m.train(max_epochs=2, progress=False)  # default: balanced again
    assert len(np.unique(m.class_weights_[m.class_weights_ > 0])) > 1
    with pytest.raises(ValueError, match="class_weight"):
        m.train(max_epochs=1, class_weight="inverse", progress=False)
