"""Every trainable model follows the one contract (issue 14): safe files, train names, provenance, trained checks."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import stimg as si

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # lightning/scvi chatter

_SRC = Path(si.__file__).parent


@pytest.fixture
def adata():
    a = si.datasets.synthetic(90, 8, image=False, as_anndata=True, seed=5)
    a.uns["X_synthetic"] = {"params": {"encoder": "synthetic", "encoder_identity": "abc", "patch_um": 112.0,
                                       "patch_px": 224}}
    a.obs["si_sampled"] = np.arange(a.n_obs) % 3 != 0
    return a


def _new_slide(a: AnnData) -> AnnData:
    """A table holding only the embedding (and its provenance): no genes, no counts."""
    new = AnnData(obs=pd.DataFrame(index=[f"t{i}" for i in range(a.n_obs)]))
    new.obsm["X_synthetic"] = a.obsm["X_synthetic"][::-1].copy()
    new.uns["X_synthetic"] = {"params": dict(a.uns["X_synthetic"]["params"])}
    return new


def _fit(kind: str, a: AnnData):
    if kind == "ridge":
        return si.models.RidgeRegressor(n_components=5).fit(a, "X_synthetic", genes=a.var_names[:4],
                                                            train_indices="si_sampled")
    si.models.NBRegressor.setup_anndata(a, embedding_key="X_synthetic")
    m = si.models.NBRegressor(a, n_hidden=8) if kind == "nb" else si.models.NBEnsemble(a, n_members=2, n_hidden=8)
    m.train(max_epochs=1, train_indices="si_sampled", accelerator="cpu", early_stopping=False, validation_size=0)
    return m


@pytest.mark.parametrize("kind", ["nb", "ensemble", "ridge"])
def test_round_trip_predicts_identically_without_training_table(adata, kind, tmp_path):
    model = _fit(kind, adata)
    path = model.save(tmp_path / f"{kind}.stimg")
    assert path.is_file() and len(list(tmp_path.iterdir())) == 1  # one file, also for the ensemble
    new = _new_slide(adata)
    want = model.predict(new)
    for loaded in (type(model).load(path), si.models.load_model(path)):
        assert type(loaded) is type(model)
        got = loaded.predict(new)
        np.testing.assert_array_equal(got.mean, want.mean)
        for f in ("aleatoric", "epistemic"):
            if getattr(want, f) is not None:
                np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
        assert got.var_names == want.var_names
    if kind != "ridge":  # trained on the 'si_sampled' column only
        rows = model.members[0].train_indices_ if kind == "ensemble" else model.train_indices_
        np.testing.assert_array_equal(rows, np.flatnonzero(adata.obs["si_sampled"]))


@pytest.mark.parametrize("kind", ["nb", "ensemble", "ridge"])
def test_provenance_is_checked_at_predict_time(adata, kind, tmp_path):
    fitted = _fit(kind, adata)
    model = type(fitted).load(fitted.save(tmp_path / "m.stimg"))
    other = _new_slide(adata)
    other.uns["X_synthetic"]["params"]["encoder"] = "uni"
    with pytest.raises(ValueError, match="encoder='uni'.*trained with encoder='synthetic'"):
        model.predict(other)
    other = _new_slide(adata)
    other.uns["X_synthetic"]["params"]["patch_um"] = 56.0
    with pytest.raises(ValueError, match="patch_um"):
        model.predict(other)
    missing = _new_slide(adata)
    del missing.obsm["X_synthetic"]
    with pytest.raises(KeyError, match=r"si.pp.embed\(data, 'synthetic', patch_um=112.0"):
        model.predict(missing)


def test_untrained_models_refuse_to_predict_and_save(adata, tmp_path):
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    for m in (si.models.NBRegressor(adata, n_hidden=4), si.models.NBEnsemble(adata, n_members=2, n_hidden=4)):
        for call in (lambda m=m: m.predict(adata), lambda m=m: m.predict_interval(adata)):
            with pytest.raises(RuntimeError, match=r"not trained; call .train\(\)"):
                call()
        with pytest.raises(RuntimeError, match="before save"):
            m.save(tmp_path / "x.stimg")
    with pytest.raises(RuntimeError, match=r"call .fit"):
        si.models.RidgeRegressor().predict(adata)
    assert not (tmp_path / "x.stimg").exists()


def test_seed_and_train_defaults_from_settings(adata, monkeypatch):
    monkeypatch.setattr(si.settings, "seed", 11)
    si.models.NBRegressor.setup_anndata(adata, embedding_key="X_synthetic")
    assert si.models.NBRegressor(adata, n_hidden=4).seed_ == 11
    assert si.models.NBEnsemble(adata, n_members=2, n_hidden=4).seeds == [11, 12]
    assert si.models.RidgeRegressor().seed == 11
    import inspect

    for cls in (si.models.NBRegressor, si.models.NBEnsemble, si.models.NBFinetuner):
        params = inspect.signature(cls.train).parameters
        assert list(params)[1:7] == ["max_epochs", "train_indices", "accelerator", "devices", "seed", "progress"]
        assert all(params[p].default is None for p in list(params)[1:7])


class _Boom:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("name", ["NBRegressor", "NBEnsemble", "NBFinetuner", "RidgeRegressor", "SamplingPolicy"])
def test_crafted_pickles_are_refused_and_run_nothing(name, tmp_path):
    import joblib
    import torch

    canary = tmp_path / "pwned"
    cls = getattr(si.models, name)
    for i, dump in enumerate((lambda o, p: p.write_bytes(pickle.dumps(o)), lambda o, p: torch.save({"x": o}, p),
                              lambda o, p: joblib.dump(o, p))):
        path = tmp_path / f"evil{i}.stimg"
        dump(_Boom(canary), path)
        with pytest.raises(ValueError, match="never unpickles|not a readable stimg model file"):
            cls.load(path)
        with pytest.raises(ValueError, match="never unpickles|not a readable stimg model file"):
            si.models.load_model(path)
        assert not canary.exists()


def test_no_unsafe_loading_in_the_source():
    pattern = re.compile(r"weights_only\s*=\s*False|joblib\.load|pickle\.loads?\(|\bnp\.load\(.*allow_pickle=True")
    hits = [f"{p.relative_to(_SRC)}:{i}" for p in _SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) or ("torch.load(" in line and "weights_only=True" not in line)]
    assert not hits, hits


def test_ridge_train_indices_forms_agree(adata):
    mask = adata.obs["si_sampled"].to_numpy()
    fits = []
    for sel in ("si_sampled", mask, np.flatnonzero(mask)):
        m = si.models.RidgeRegressor(n_components=4, alpha=1.0).fit(adata, "X_synthetic", genes=adata.var_names[:3],
                                                                     train_indices=sel)
        fits.append(m.predict(adata).mean)
        assert m.n_train_ == int(mask.sum())
    np.testing.assert_array_equal(fits[0], fits[1])
    np.testing.assert_array_equal(fits[0], fits[2])


def test_policy_round_trip_continues_identically(tmp_path):
    pol = si.models.SamplingPolicy(4, 8, lr=0.05, seed=0)
    emb = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    avail = np.ones(30, bool)
    pol.reinforce(emb, avail, [pol.sample(emb, avail, 3) for _ in range(4)], np.arange(4.0))
    path = pol.save(tmp_path / "policy.stimg")
    again = si.models.load_model(path)
    np.testing.assert_array_equal(again.sample(emb, avail, 5), pol.sample(emb, avail, 5))
    draws = [pol.sample(emb, avail, 3) for _ in range(4)]
    assert again.reinforce(emb, avail, draws, np.arange(4.0)) == pol.reinforce(emb, avail, draws, np.arange(4.0))
    np.testing.assert_array_equal(again.scores(emb), pol.scores(emb))
