"""NBFinetuner: end-to-end fine-tuning of an encoder with the NB head (tiny backbones, a few epochs)."""

import numpy as np
import pytest
import torch
from torch import nn

import stimg as si
from stimg.models._nb._module import nb_log_prob

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # lightning chatter


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


@pytest.fixture
def sdata():
    return si.datasets.synthetic(36, 6, mpp=4.0)


def _model(sdata, **kwargs):
    kwargs = {"encoder": _tiny_net(), "target_key": None, "patch_px": 32, "input_px": 32, "n_hidden": 16, **kwargs}
    return si.models.NBFinetuner(sdata, **kwargs)


def _nll(model, sdata, accelerator):
    _, rb = model._per_row(sdata, None, "nb", 64, accelerator, 0)  # also before training
    r, b = rb[:, :len(model.genes_)], rb[:, len(model.genes_):]
    y = torch.as_tensor(sdata["table"].X.toarray(), dtype=torch.float64)
    return float(-nb_log_prob(y, torch.from_numpy(r), torch.from_numpy(b)).sum(1).mean())


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_train_predict_embed(sdata, accelerator):
    table = sdata["table"]
    keys_before = (set(table.obs), set(table.obsm), set(table.layers), set(table.var), set(table.uns))
    m = _model(sdata)
    enc0, head0 = _state(m.net.encoder), _state(m.net.head)
    before = _nll(m, sdata, accelerator)
    m.train(max_epochs=3, batch_size=8, lr=1e-2, backbone_lr=1e-3, accelerator=accelerator,
            early_stopping=False, validation_size=0)
    assert _nll(m, sdata, accelerator) < before
    h = m.history_
    assert list(h["epoch"]) == [0, 1, 2] and h["train_nll"].iloc[-1] < h["train_nll"].iloc[0]
    assert not _same(enc0, _state(m.net.encoder)) and not _same(head0, _state(m.net.head))
    assert (set(table.obs), set(table.obsm), set(table.layers), set(table.var), set(table.uns)) == keys_before

    pred = m.predict(sdata, accelerator=accelerator)
    assert pred.mean.shape == (36, 6) and pred.scale == "log1p" and np.all(pred.aleatoric >= 0)
    assert pred.var_names == list(table.var_names)
    counts = m.predict(sdata, scale="counts", accelerator=accelerator)
    assert np.all(pred.mean <= np.log1p(counts.mean) + 1e-4)  # Jensen
    lo, hi = m.predict_interval(sdata, 0.8, accelerator=accelerator)
    assert lo.shape == (36, 6) and np.all(lo <= hi)
    emb = m.get_embedding(sdata, accelerator=accelerator)
    assert emb.shape == (36, 8) and emb.dtype == np.float32

    si.tl.predict_expression(sdata, m, accelerator=accelerator)
    np.testing.assert_allclose(table.layers["si_pred"], pred.mean, rtol=1e-5, atol=1e-5)
    assert table.var["si_predicted"].all() and "si_aleatoric" in table.layers


def test_frozen_backbone_warmup(sdata, accelerator):
    m = _model(sdata)
    enc0, head0 = _state(m.net.encoder), _state(m.net.head)
    m.train(max_epochs=1, freeze_backbone_epochs=1, batch_size=8, accelerator=accelerator, validation_size=0.2)
    assert _same(enc0, _state(m.net.encoder))  # weights and batch-norm statistics untouched
    assert not _same(head0, _state(m.net.head))
    assert list(m.history_["frozen"]) == [True] and "val_nll" in m.history_
    assert len(m.validation_indices_) == 7 and len(m.train_indices_) == 29
    assert not np.intersect1d(m.validation_indices_, m.train_indices_).size
    m.train(max_epochs=2, freeze_backbone_epochs=1, batch_size=8, accelerator=accelerator, early_stopping=False,
            validation_size=0)
    assert list(m.history_["frozen"]) == [True, False]
    assert not _same(enc0, _state(m.net.encoder))
    assert all(p.requires_grad for p in m.net.encoder.parameters())


def test_save_load_roundtrip(sdata, accelerator, tmp_path):
    m = _model(sdata)
    m.train(max_epochs=1, batch_size=8, accelerator=accelerator, train_indices=np.arange(24), validation_size=0.25)
    assert set(m.train_indices_) | set(m.validation_indices_) == set(range(24))
    m.save(tmp_path / "ft.stimg")
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "ft.stimg")
    with pytest.raises(ValueError, match="encoder="):
        si.models.NBFinetuner.load(tmp_path / "ft.stimg", sdata)
    m2 = si.models.NBFinetuner.load(tmp_path / "ft.stimg", encoder=_tiny_net(seed=1))  # predicts without data
    assert m2.genes_ == m.genes_ and m2.is_trained_ and len(m2.history_) == 1
    a, b = m.predict(sdata), m2.predict(sdata)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.aleatoric, b.aleatoric)


def test_efficientnet_lite0_roundtrip(accelerator, tmp_path):
    sdata = si.datasets.synthetic(16, 6, mpp=4.0)
    table = sdata["table"]
    table.var["si_target"] = np.arange(6) < 4
    m = si.models.NBFinetuner(sdata, patch_px=32, input_px=32, pretrained=False, n_hidden=0)
    assert m.genes_ == list(table.var_names[:4])
    enc0 = _state(m.net.encoder)
    m.train(max_epochs=1, batch_size=8, accelerator=accelerator, train_indices=np.arange(8), early_stopping=False,
            validation_size=0)
    assert not _same(enc0, _state(m.net.encoder))
    m.save(tmp_path / "lite0.stimg")
    m2 = si.models.NBFinetuner.load(tmp_path / "lite0.stimg", sdata)
    m2.train(max_epochs=1, batch_size=8, accelerator=accelerator, early_stopping=False, validation_size=0)
    emb = m.get_embedding(sdata, accelerator=accelerator)
    assert emb.shape == (16, 1280)
    m3 = si.models.load_model(tmp_path / "lite0.stimg")
    np.testing.assert_array_equal(emb, m3.get_embedding(sdata, accelerator=accelerator))


def test_errors(sdata, tmp_path):
    with pytest.raises(KeyError, match="Available"):
        _model(sdata, target_key="no_such_column")
    with pytest.raises(KeyError, match="missing"):
        _model(sdata, genes=["not_a_gene"])
    m = _model(sdata)
    with pytest.raises(RuntimeError, match="not trained"):
        m.predict(sdata)
    with pytest.raises(ValueError, match="selects no spot"):
        m.train(train_indices=np.zeros(36, bool), accelerator="cpu")
    with pytest.raises(ValueError, match="no training spots"):
        m.train(train_indices=[0], accelerator="cpu")
    with pytest.raises(ValueError, match="train_indices"):
        m.train(train_indices=[0, 99], accelerator="cpu")
    with pytest.raises(ValueError, match="scale"):
        m.predict(sdata, scale="log")
    with pytest.raises(ValueError, match="level"):
        m.predict_interval(sdata, 1.5)
    with pytest.raises(FileNotFoundError):
        si.models.NBFinetuner.load(tmp_path / "nothing", sdata)
    table = sdata["table"]
    x = table.X.toarray()
    x[0, 0] = np.nan
    table.layers["bad"] = x
    with pytest.raises(ValueError, match="non-finite"):
        _model(sdata, layer="bad")
    with pytest.raises(KeyError, match="Available"):
        _model(sdata, layer="missing_layer")


def test_her2st_c2_smoke(c2_sdata):
    """A few real C2 spots, one epoch of the tiny backbone on 112 µm patches."""
    import spatialdata as sd

    table = c2_sdata["table"][:24].copy()
    sub = sd.SpatialData(images=dict(c2_sdata.images), shapes=dict(c2_sdata.shapes), tables={"table": table})
    genes = list(table.var_names[np.asarray(table.X.sum(0)).ravel().argsort()[-5:]])
    m = _model(sub, genes=genes)
    m.train(max_epochs=1, batch_size=8, accelerator="cpu", early_stopping=False, validation_size=0)
    pred = m.predict(sub)
    assert pred.mean.shape == (24, 5) and np.isfinite(pred.mean).all()
