"""ContrastiveAligner, si.tl.align and si.tl.retrieve: training, clamp, retrieval, save/load, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import stimg as si

pytest.importorskip("scvi")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_pairs(her2st_c_adata):
    """Real HER2ST C2–C4 spots: log1p counts of 100 HVGs ↔ the study's per-spot cell-type composition.

    Two real views of each spot (measured expression; stereoscope deconvolution from the original
    study, in ``.obsm['deconv_major']`` standing in for image features), read without images so
    the test stays fast; the image-feature path is the same ``.obsm`` input.
    """
    a = her2st_c_adata[her2st_c_adata.obs["library_id"].isin(["C2", "C3", "C4"])].copy()
    genes = si.pp.select_genes(a, 100, method="hvg", subset=["C2", "C3"], inplace=False)
    a = a[:, list(genes)].copy()
    a.obsm["X_view"] = np.asarray(a.obsm["deconv_major"], dtype=np.float32)
    a.uns["X_view"] = {"params": {"encoder": "stereoscope-deconvolution", "dim": a.obsm["X_view"].shape[1]}}
    return a


@pytest.fixture
def synth():
    a = si.datasets.synthetic(160, 24, n_sections=2, image=False, as_anndata=True)
    a.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "patch_um": 112.0, "patch_px": 224}}
    return a


def _trained(a, **kw):
    si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic", genes=a.var_names)
    m = si.models.ContrastiveAligner(a, n_latent=8, image_hidden=32, gene_hidden=32, seed=0, **kw)
    m.train(3, batch_size=32, accelerator="cpu")
    return m


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.real
def test_loss_decreases_on_real_data_and_temperature_stays_in_clamp(real_pairs, accelerator):
    a = real_pairs.copy()
    train = a.obs["library_id"].isin(["C2", "C3"]).to_numpy()
    si.models.ContrastiveAligner.setup_anndata(a, "X_view", genes=a.var_names)
    # a tight clamp and a high learning rate: the temperature is pushed against the clamp
    m = si.models.ContrastiveAligner(a, n_latent=32, image_hidden=64, dropout=0.1, temperature=0.1,
                                     min_temperature=0.08, max_temperature=0.2, seed=0)
    m.train(25, train_indices=train, batch_size=128, lr=3e-2, accelerator=accelerator)
    loss = m.history_["elbo_train"].iloc[:, 0].to_numpy()
    temps = m.history_["temperature_train"].iloc[:, 0].to_numpy()
    assert loss[-1] < 0.8 * loss[0], loss
    assert np.all((temps >= 0.08 - 1e-6) & (temps <= 0.2 + 1e-6)), temps
    assert 0.08 - 1e-6 <= m.temperature <= 0.2 + 1e-6
    assert float(m.module.contrastive.scale.log_scale.detach()) <= np.log(1 / 0.08) + 1e-6  # parameter clamped too
    # held-out section C4: whole-section recall is above chance in both directions
    test = a[~train].copy()
    zi = m.get_latent_representation(test, modality="image")
    zg = m.get_latent_representation(test, modality="gene")
    res = si.metrics.recall_at_k(zi, zg, k=(10,), names=("image", "gene"))
    assert res.value(10, "image→gene") > 1.5 * 10 / test.n_obs
    assert res.value(10, "gene→image") > 1.5 * 10 / test.n_obs
    # retrieval prediction on the held-out section correlates with the truth
    pred = m.predict(test, k=20).mean
    truth = np.log1p(test.X.toarray() if hasattr(test.X, "toarray") else test.X)
    assert si.metrics.pearson(truth, pred).mean > 0.1


# ---------------------------------------------------------------------------------------------- retrieval
def test_retrieval_known_answer_and_tl_functions(synth):
    a = synth
    m = _trained(a)
    assert m.is_trained_ and m.bank_profiles_.shape == (a.n_obs, a.n_vars)
    # BLEEP mean of the top-k bank profiles, recomputed by hand
    k = 7
    pred = m.predict(a[:30], k=k, weighting="mean").mean
    zi = m.get_latent_representation(a[:30], modality="image")
    sims = zi @ m.bank_embedding_.T
    top = np.argsort(-sims, axis=1)[:, :k]
    np.testing.assert_allclose(pred, m.bank_profiles_[top].mean(1), rtol=1e-5, atol=1e-6)
    # softmax weighting at the learnt temperature
    w = np.exp((np.take_along_axis(sims, top, 1) - sims.max(1, keepdims=True)) / m.temperature)
    w /= w.sum(1, keepdims=True)
    soft = m.predict(a[:30], k=k, weighting="softmax").mean
    np.testing.assert_allclose(soft, np.einsum("nk,nkg->ng", w, m.bank_profiles_[top]), rtol=1e-4, atol=1e-5)
    # a reference table gives the same answer as the bank built from the same spots
    np.testing.assert_allclose(m.predict(a[:30], k=k, reference=a, weighting="softmax").mean, soft, rtol=1e-4,
                               atol=1e-5)
    cos = np.clip(np.take_along_axis(sims, top, 1), 0, None)
    np.testing.assert_allclose(m.predict(a[:30], k=k, weighting="similarity").mean,
                               np.einsum("nk,nkg->ng", cos / cos.sum(1, keepdims=True), m.bank_profiles_[top]),
                               rtol=1e-4, atol=1e-5)
    # si.tl.retrieve on tiles without counts → .layers via predict_expression
    tiles = a[:30].copy()
    tiles.X = None
    si.tl.retrieve(tiles, m, k=k, weighting="mean")
    np.testing.assert_allclose(tiles.layers["si_pred"], pred, rtol=1e-6)
    assert tiles.uns["si_pred"]["params"]["method"] == "retrieval" and tiles.uns["si_pred"]["params"]["k"] == k
    # si.tl.align: image side always, gene side only where counts exist
    si.tl.align(tiles, m)
    assert "si_align_image" in tiles.obsm and "si_align_gene" not in tiles.obsm
    si.tl.align(a, m)
    assert a.obsm["si_align_gene"].shape == (a.n_obs, 8)
    np.testing.assert_allclose(np.linalg.norm(a.obsm["si_align_image"], axis=1), 1.0, rtol=1e-5)
    part = a[:20].copy()
    part.X = part.X.toarray() if hasattr(part.X, "toarray") else part.X.copy()
    part.X[3] = np.nan  # a spot without counts → NaN row on the gene side only
    si.tl.align(part, m)
    assert np.isnan(part.obsm["si_align_gene"][3]).all() and np.isfinite(part.obsm["si_align_gene"][4]).all()
    assert np.isfinite(part.obsm["si_align_image"]).all()


def test_save_load_round_trip_predicts_identically(synth, tmp_path):
    a = synth
    m = _trained(a, loss="siglip")
    path = m.save(tmp_path / "align.stimg")
    back = si.models.ContrastiveAligner.load(path)
    again = si.models.load_model(path)
    p0 = m.predict(a, k=5).mean
    for other in (back, again):
        np.testing.assert_array_equal(other.predict(a, k=5).mean, p0)
        np.testing.assert_array_equal(other.get_latent_representation(a, modality="gene"),
                                      m.get_latent_representation(a, modality="gene"))
        assert other.temperature == pytest.approx(m.temperature)
    assert float(back.module.contrastive.bias.detach()) == pytest.approx(float(m.module.contrastive.bias.detach()))
    assert list(back.history_) and back.genes_ == m.genes_
    # attaching a table re-registers it, so training can continue
    cont = si.models.ContrastiveAligner.load(path, a)
    cont.train(1, batch_size=32, accelerator="cpu")
    assert cont.is_trained_


def test_gene_latent_input(synth):
    a = synth
    rng = np.random.default_rng(0)
    a.obsm["X_latent"] = (np.log1p(a.X.toarray() if hasattr(a.X, "toarray") else a.X) @ rng.normal(size=(a.n_vars, 6))
                          ).astype(np.float32)
    si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic", genes=a.var_names[:10], gene_embedding_key="X_latent")
    m = si.models.ContrastiveAligner(a, n_latent=8, image_hidden=16, gene_hidden=16, seed=0)
    m.train(2, batch_size=32, accelerator="cpu")
    assert m.module_config_["n_gene"] == 6 and m.bank_profiles_.shape == (a.n_obs, 10)
    assert m.has_expression(a) and m.has_expression(a[:, :3].copy())  # the latent, not the genes, decides
    b = a.copy()
    del b.obsm["X_latent"]
    assert not m.has_expression(b)
    with pytest.raises(KeyError, match="X_latent"):
        m.predict(a[:10], reference=b)


def test_spatial_context_input_and_image_scaling(synth, tmp_path):
    """Spatial-context features as the image input: scaling rule, saved with the model, context checked on new data."""
    a = synth
    si.pp.spatial_context(a, "X_synthetic", radius_um=500, key_added="X_ctx")
    x = a.obsm["X_ctx"].astype(np.float64)
    si.models.ContrastiveAligner.setup_anndata(a, "X_ctx", genes=a.var_names)
    iso = si.models.ContrastiveAligner(a, n_latent=8, image_hidden=16, gene_hidden=16, seed=0)
    iso.train(2, batch_size=32, accelerator="cpu")
    per = si.models.ContrastiveAligner(a, n_latent=8, image_hidden=16, gene_hidden=16, seed=0,
                                       standardize="per_feature")
    per.train(2, batch_size=32, accelerator="cpu")
    # isotropic: one scale (the mean per-feature SD), so the smooth context block keeps its smaller spread
    np.testing.assert_allclose(iso.module.image_std.numpy(), np.full(x.shape[1], x.std(0).mean()), rtol=1e-5)
    np.testing.assert_allclose(per.module.image_std.numpy(), x.std(0), rtol=1e-4)
    np.testing.assert_allclose(iso.module.image_mean.numpy(), x.mean(0), rtol=1e-4, atol=1e-5)
    back = si.models.load_model(iso.save(tmp_path / "iso.stimg"))
    assert back.module.standardize == "isotropic"
    np.testing.assert_array_equal(back.predict(a, k=5).mean, iso.predict(a, k=5).mean)
    # new data must carry context features derived the same way (radius), not just the same encoder
    other = a.copy()
    del other.obsm["X_ctx"], other.uns["X_ctx"]
    si.pp.spatial_context(other, "X_synthetic", radius_um=250, key_added="X_ctx")
    with pytest.raises(ValueError, match="derive it the same way"):
        si.tl.retrieve(other, iso)
    assert "si_pred" not in other.layers
    with pytest.raises(ValueError, match="standardize must be one of"):
        si.models.ContrastiveAligner(a, standardize="zscore")


# ---------------------------------------------------------------------------------------------- bad input
def test_errors_name_the_fix_and_write_nothing(synth):
    a = synth
    before = set(a.obsm)
    with pytest.raises(KeyError, match="si.pp.embed"):
        si.models.ContrastiveAligner.setup_anndata(a, "X_missing", genes=a.var_names)
    with pytest.raises(KeyError, match="genes="):
        si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic")
    with pytest.raises(KeyError, match="not in adata.var_names"):
        si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic", genes=["nope"])
    bad = a.copy()
    bad.obsm["X_synthetic"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        si.models.ContrastiveAligner.setup_anndata(bad, "X_synthetic", genes=a.var_names)
    assert set(a.obsm) == before and "_si_align_log1p" not in bad.obsm
    with pytest.raises(ValueError, match="contrastive loss"):
        si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic", genes=a.var_names)
        si.models.ContrastiveAligner(a, loss="triplet")

    si.models.ContrastiveAligner.setup_anndata(a, None, genes=a.var_names)
    with pytest.raises(ValueError, match="either image features .* or an image encoder"):
        si.models.ContrastiveAligner(a)
    import inspect

    params = inspect.signature(si.models.ContrastiveAligner.train).parameters  # the model contract
    assert list(params)[1:7] == ["max_epochs", "train_indices", "accelerator", "devices", "seed", "progress"]
    assert all(params[p].default is None for p in list(params)[1:7])

    si.models.ContrastiveAligner.setup_anndata(a, "X_synthetic", genes=a.var_names)
    m = si.models.ContrastiveAligner(a, n_latent=8, image_hidden=16, gene_hidden=16)
    with pytest.raises(RuntimeError, match="not trained"):
        m.predict(a)
    with pytest.raises(ValueError, match="at least 2 training spots"):
        m.train(1, train_indices=[0])
    with pytest.raises(TypeError, match="must be boolean"):
        m.train(1, train_indices="library_id")
    m.train(1, batch_size=32, accelerator="cpu")

    other = a.copy()
    other.obsm["X_synthetic"] = other.obsm["X_synthetic"][:, :5]
    with pytest.raises(ValueError, match="features but the model was trained on"):
        m.predict(other)
    other = a.copy()
    other.uns["X_synthetic"]["params"]["encoder"] = "uni"
    with pytest.raises(ValueError, match="encoder"):
        si.tl.retrieve(other, m)
    assert "si_pred" not in other.layers
    with pytest.raises(ValueError, match="k must be"):
        si.tl.retrieve(a, m, k=0)
    with pytest.raises(ValueError, match="weighting"):
        si.tl.retrieve(a, m, weighting="max")
    assert "si_pred" not in a.layers
    with pytest.raises(KeyError, match="not in the model's reference bank"):
        m.predict(a, genes=["nope"])
    with pytest.raises(TypeError, match="ContrastiveAligner"):
        si.tl.align(a, object())
    a.obsm["si_align_image"] = np.zeros((a.n_obs, 2))  # the user's own key
    with pytest.raises(KeyError, match="never overwrites"):
        si.tl.align(a, m)
    assert a.obsm["si_align_image"].shape == (a.n_obs, 2) and "si_align_gene" not in a.obsm
    with pytest.raises(ValueError, match="modality"):
        m.get_latent_representation(a, modality="text")


# ---------------------------------------------------------------------------------------------- LoRA ViT
def test_lora_vit_image_tower_trains_adapters_only(tmp_path, accelerator):
    """The GPU path (LoRA fine-tuning of a ViT on patches), on the CPU with a tiny random-weight ViT."""
    pytest.importorskip("peft")
    sdata = si.datasets.synthetic(48, 12, mpp=4.0, seed=1)
    table = sdata.tables["table"]
    si.models.ContrastiveAligner.setup_anndata(table, None, genes=table.var_names)
    m = si.models.ContrastiveAligner(
        table, image_encoder="vit_tiny_patch16_224", pretrained=False, input_px=32, patch_px=32, images=sdata,
        encoder_kwargs={"depth": 2, "img_size": 32, "patch_size": 8}, lora_rank=4, n_latent=8, gene_hidden=16,
        image_hidden=16, seed=0,
    )
    assert m.needs_images
    enc = m.module.image_encoder
    base = {k: v.detach().clone() for k, v in enc.named_parameters() if "lora_" not in k}
    lora = {k: v.detach().clone() for k, v in enc.named_parameters() if "lora_B" in k}
    assert lora and all(not p.requires_grad for k, p in enc.named_parameters() if "lora_" not in k)
    m.train(3, batch_size=16, lr=1e-2, accelerator=accelerator)
    after = dict(enc.named_parameters())
    assert all(torch_equal(base[k], after[k]) for k in base)  # frozen backbone
    assert any(not torch_equal(lora[k], after[k]) for k in lora)  # adapters moved (LoRA B starts at 0)
    si.tl.align(sdata, m)
    assert table.obsm["si_align_image"].shape == (48, 8)
    si.tl.retrieve(sdata, m, k=5)  # predict_expression hands the SpatialData to the model (needs_images)
    pred = table.layers["si_pred"].copy()
    path = m.save(tmp_path / "lora.stimg")
    back = si.models.load_model(path)
    assert back.needs_images
    np.testing.assert_allclose(back.predict(sdata, k=5).mean, pred, rtol=1e-5, atol=1e-6)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
