"""SCR2Net: retrieval rules with known answers, heads that train, the model contract, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import stimg as si
from stimg.models._scr2net import _retrieval as R


# ------------------------------------------------------------------ retrieval rules (known answers)
def test_majority_filter_keeps_exactly_the_t_most_frequent_types():
    #            rank: 0  1  2  3  4  5  6  7  8
    types = torch.tensor([[2, 0, 2, 1, 0, 2, 3, 1, 0]])  # counts: 2→3, 0→3, 1→2, 3→1
    keep = R.majority_type_mask(types, 2)
    np.testing.assert_array_equal(keep[0].numpy(), [1, 1, 1, 0, 1, 1, 0, 0, 1])
    keep3 = R.majority_type_mask(types, 3)  # + type 1
    np.testing.assert_array_equal(keep3[0].numpy(), [1, 1, 1, 1, 1, 1, 0, 1, 1])
    # ties in count go to the type whose first spot ranks higher: 2 (rank 0) before 0 (rank 1)
    np.testing.assert_array_equal(R.majority_type_mask(types, 1)[0].numpy(), [1, 0, 1, 0, 0, 1, 0, 0, 0])
    # T ≥ the number of types present, or no filter: keep all
    assert R.majority_type_mask(types, 10).all()
    assert R.majority_type_mask(types, None).all()
    # per row, and unknown types (−1) are never kept
    two = torch.tensor([[5, 5, 1, 1, 1, -1], [-1, -1, -1, -1, -1, -1]])
    keep = R.majority_type_mask(two, 1)
    np.testing.assert_array_equal(keep[0].numpy(), [0, 0, 1, 1, 1, 0])
    assert keep[1].all()  # no known type at all: nothing to filter by


def test_retrieve_soft_label_mask_and_self_exclusion():
    # bank of 5 unit keys; the query equals key 0 (itself, excluded), is close to 1 and 2, far from 3, 4
    keys = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0, 0], [0.9, 0.1, 0], [0.8, 0.2, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    values = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    types = torch.tensor([0, 1, 0, 0, 1])
    q = keys[:1]
    sims, idx = R.top_k(q, keys, 3, exclude=torch.tensor([0]))
    np.testing.assert_array_equal(idx[0].numpy(), [1, 2, 3])
    y, m = R.retrieve(q, keys, values, types, k=3, n_types=1, threshold=0.15, exclude=torch.tensor([0]))
    # top-3 = spots 1 (type 1), 2 (type 0), 3 (type 0): type 0 is the majority → mean of spots 2 and 3
    np.testing.assert_allclose(y[0].numpy(), values[[2, 3]].mean(0).numpy())
    assert float(m[0]) == (float(sims.mean()) > 0.15)
    y_all, _ = R.retrieve(q, keys, values, None, k=3, n_types=1, threshold=0.15, exclude=torch.tensor([0]))
    np.testing.assert_allclose(y_all[0].numpy(), values[[1, 2, 3]].mean(0).numpy())
    _, m_hi = R.retrieve(q, keys, values, types, k=4, n_types=None, threshold=0.99)
    assert float(m_hi[0]) == 0.0  # mean similarity of the top-4 is far below 0.99


# ------------------------------------------------------------------ model on synthetic data
@pytest.fixture
def syn():
    a = si.datasets.synthetic(120, 12, image=False, as_anndata=True, seed=1)
    return a


def _snapshot(adata):
    return {"obs": adata.obs.copy(), "obsm": set(adata.obsm), "layers": set(adata.layers), "uns": set(adata.uns),
            "var": adata.var.copy(), "X": np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X).copy()}


def _assert_same(adata, snap):
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert set(adata.obsm) == snap["obsm"] and set(adata.layers) == snap["layers"] and set(adata.uns) == snap["uns"]
    x = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X)
    np.testing.assert_array_equal(x, snap["X"])


def test_projection_heads_train_and_all_modes_predict(syn, accelerator):
    m = si.models.SCR2Net(syn, "X_synthetic", target_key=None, cell_types="cell_type_fractions", top_k=15, n_types=2)
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    m.train(max_epochs=4, accelerator=accelerator, batch_size=32, progress=False, seed=0)
    after = m.module.state_dict()
    for head in ("image_head", "expr_head"):
        names = [k for k in before if k.startswith(head) and k.endswith("weight")]
        assert names
        for k in names:  # every layer of both projection heads moved
            assert not torch.allclose(before[k], after[k]), k
    assert not torch.allclose(before["contrastive.scale.log_scale"], after["contrastive.scale.log_scale"])
    h = m.history_
    assert {"train_reg", "train_con", "train_kd", "train_mask", "val_reg", "val_ret"} <= set(h.columns)
    assert np.isnan(h["train_kd"].iloc[0]) and h["train_kd"].iloc[1:].notna().all()  # KD starts at epoch 1
    assert m.module.bank_values.shape[0] == len(m.train_indices_) and m.cell_type_names_
    preds = {mode: m.predict(syn, mode=mode).mean for mode in ("regression", "retrieval", "blend")}
    np.testing.assert_allclose(preds["blend"], 0.5 * preds["regression"] + 0.5 * preds["retrieval"], rtol=1e-5, atol=1e-5)
    si.tl.predict_expression(syn, m, mode="blend", key_added="scr2")
    np.testing.assert_allclose(syn.layers["scr2"], preds["blend"], rtol=1e-6)
    zi, ze = m.get_projections(syn)
    np.testing.assert_allclose(np.linalg.norm(zi, axis=1), 1, rtol=1e-5)
    assert ze.shape == zi.shape


def test_regression_only_has_no_heads(syn):
    m = si.models.SCR2Net(syn, "X_synthetic", target_key=None, retrieval=False)
    assert not any(k.startswith(("image_head", "expr_head")) for k in m.module.state_dict())
    m.train(max_epochs=2, accelerator="cpu", batch_size=32, progress=False)
    assert "train_con" not in m.history_
    with pytest.raises(ValueError, match="retrieval=False"):
        m.predict(syn, mode="retrieval")


def test_save_load_round_trip_predicts_identically(syn, tmp_path):
    m = si.models.SCR2Net(syn, "X_synthetic", target_key=None, cell_types="cell_type", top_k=10, n_types=1)
    m.train(max_epochs=2, accelerator="cpu", batch_size=32, progress=False)
    path = m.save(tmp_path / "scr2.stimg")
    back = si.models.SCR2Net.load(path)
    back2 = si.models.load_model(path)
    for mode in ("regression", "retrieval", "blend"):
        ref = m.predict(syn, mode=mode).mean
        np.testing.assert_array_equal(back.predict(syn, mode=mode).mean, ref)
        np.testing.assert_array_equal(back2.predict(syn, mode=mode).mean, ref)
    assert back.cell_type_names_ == m.cell_type_names_ and back.genes_ == m.genes_
    np.testing.assert_array_equal(back.train_indices_, m.train_indices_)
    with pytest.raises(RuntimeError, match="without its training data"):
        back.train(max_epochs=1)


def test_train_on_sampled_obs_mask(syn):
    si.tl.active_sample(syn, 0.5, method="random", mode="simulate", embedding_key="X_synthetic", seed=0,
                        progress=False)
    sampled = np.flatnonzero(syn.obs["si_sampled"].to_numpy())
    # counts of unsampled spots are never read: NaN there must not matter
    syn.X = np.asarray(syn.X.toarray() if hasattr(syn.X, "toarray") else syn.X, dtype=np.float32)
    rest = np.setdiff1d(np.arange(syn.n_obs), sampled)
    syn.X[rest[:5]] = np.nan
    m = si.models.SCR2Net(syn, "X_synthetic", target_key=None, cell_types="cell_type_fractions")
    m.train(max_epochs=2, train_indices="si_sampled", accelerator="cpu", batch_size=32, progress=False)
    used = np.union1d(m.train_indices_, m.validation_indices_)
    np.testing.assert_array_equal(used, sampled)
    assert m.module.bank_values.shape[0] == len(m.train_indices_)
    assert np.isfinite(m.predict(syn, mode="retrieval").mean).all()


def test_bad_input_raises_and_writes_nothing(syn):
    snap = _snapshot(syn)
    with pytest.raises(ValueError, match="exactly one of embedding_key"):
        si.models.SCR2Net(syn, target_key=None)
    with pytest.raises(KeyError, match="si.pp.embed"):
        si.models.SCR2Net(syn, "X_missing", target_key=None)
    with pytest.raises(KeyError, match="SingleCellPrior"):
        si.models.SCR2Net(syn, "X_synthetic", target_key=None, cell_types="no_such_types")
    with pytest.raises(KeyError, match="si_target"):
        si.models.SCR2Net(syn, "X_synthetic")  # no target genes selected
    with pytest.raises(ValueError, match="n_types"):
        si.models.SCR2Net(syn, "X_synthetic", target_key=None, n_types=0)
    m = si.models.SCR2Net(syn, "X_synthetic", target_key=None, cell_types="cell_type")
    with pytest.raises(RuntimeError, match="not trained"):
        m.predict(syn)
    with pytest.raises(KeyError, match="not found in adata.obs"):
        m.train(max_epochs=1, train_indices="nope", progress=False)
    with pytest.raises(TypeError, match="must be boolean"):
        m.train(max_epochs=1, train_indices="cell_type", progress=False)
    bad = syn.copy()
    bad.obsm["X_synthetic"] = bad.obsm["X_synthetic"].copy()
    bad.obsm["X_synthetic"][3, 0] = np.nan
    mb = si.models.SCR2Net(bad, "X_synthetic", target_key=None)
    with pytest.raises(ValueError, match="non-finite"):
        mb.train(max_epochs=1, progress=False)
    m.train(max_epochs=1, accelerator="cpu", batch_size=32, progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        si.tl.predict_expression(syn, m, mode="nearest")
    other = syn.copy()
    other.obsm["X_synthetic"] = other.obsm["X_synthetic"][:, :5]
    with pytest.raises(ValueError, match="features"):
        si.tl.predict_expression(other, m)
    _assert_same(syn, snap)
    assert "si_pred" not in other.layers


def test_cell_types_from_real_her2st_deconvolution(her2st_c_adata):
    from stimg.models._scr2net._model import _cell_types

    a = her2st_c_adata
    rows = np.arange(0, a.n_obs, 7)
    codes, names = _cell_types(a, "deconv_minor", rows, None)
    prop = a.obsm["deconv_minor"]
    assert len(names) == prop.shape[1] == 22 and "NK cells" in names  # column names stripped
    cols = np.asarray(prop.columns)
    np.testing.assert_array_equal(np.asarray(names)[codes], cols[prop.to_numpy()[rows].argmax(1)])


def test_end_to_end_densenet_small_input():
    sdata = si.datasets.synthetic(16, 5, mpp=4.0, seed=0)
    m = si.models.SCR2Net(sdata, encoder="densenet121", target_key=None, pretrained=False, patch_px=32, input_px=32,
                          cell_types="cell_type", top_k=4, n_types=1, n_hidden=16, n_proj=8)
    enc_before = {k: v.clone() for k, v in m.module.encoder.state_dict().items() if v.dtype.is_floating_point}
    m.train(max_epochs=1, batch_size=8, accelerator="cpu", validation_size=0, early_stopping=False, progress=False)
    changed = [k for k, v in m.module.encoder.state_dict().items() if k in enc_before and not torch.equal(v, enc_before[k])]
    assert changed  # the backbone is trained end to end
    pred = si.tl.predict_expression(sdata, m, mode="blend", inplace=False)
    assert pred.mean.shape == (16, 5) and np.isfinite(pred.mean).all()
    assert m.needs_images


def test_warmup_trains_heads_only(syn):
    m = si.models.SCR2Net(syn, "X_synthetic", target_key=None, cell_types="cell_type")
    m.train(max_epochs=1, accelerator="cpu", batch_size=32, validation_size=0, early_stopping=False, progress=False)
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    m.train(max_epochs=2, warmup_epochs=2, accelerator="cpu", batch_size=32, validation_size=0, early_stopping=False,
            progress=False)
    after = m.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("regressor."))
    assert not torch.equal(before["image_head.net.0.weight"], after["image_head.net.0.weight"])
    assert "train_reg" not in m.history_ and "train_kd" not in m.history_


def test_contract_seed_provenance_and_foreign_files(syn, tmp_path, monkeypatch):
    import inspect
    import pickle

    monkeypatch.setattr(si.settings, "seed", 7)
    syn.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "patch_um": 112.0, "patch_px": 224}}
    m = si.models.SCR2Net(syn, "X_synthetic", target_key=None)
    assert m.params_["seed"] == 7
    params = inspect.signature(si.models.SCR2Net.train).parameters
    assert list(params)[1:7] == ["max_epochs", "train_indices", "accelerator", "devices", "seed", "progress"]
    m.train(max_epochs=1, accelerator="cpu", batch_size=32, progress=False)
    loaded = si.models.SCR2Net.load(m.save(tmp_path / "m.stimg"))
    new = si.datasets.synthetic(30, 3, image=False, as_anndata=True, seed=9)  # other genes: only features matter
    new.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "patch_um": 112.0, "patch_px": 224}}
    assert loaded.predict(new, mode="blend").mean.shape == (30, syn.n_vars)
    new.uns["X_synthetic"]["params"]["encoder"] = "uni"
    with pytest.raises(ValueError, match="encoder='uni'"):
        loaded.predict(new)
    evil = tmp_path / "evil.stimg"
    evil.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="never unpickles"):
        si.models.SCR2Net.load(evil)
