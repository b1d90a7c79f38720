"""The one model file format and training-argument contract (stimg.models._base)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from anndata import AnnData

from stimg.models import _base


class _Toy(_base.ModelIO):
    def __init__(self, w):
        self.w = np.asarray(w, np.float32)
        self.is_trained_ = True

    def _get_state(self):
        return {"n": int(self.w.size), "genes": ["A", "B"]}, {"w": self.w}

    @classmethod
    def _from_state(cls, header, tensors, adata=None, **kwargs):
        assert header["genes"] == ["A", "B"]
        return cls(tensors["w"].numpy())


def test_round_trip_and_dispatch(tmp_path):
    m = _Toy([1.0, 2.0, 3.0])
    path = m.save(tmp_path / "toy.stimg")
    back = _Toy.load(path)
    np.testing.assert_array_equal(back.w, m.w)
    np.testing.assert_array_equal(_base.load_model(path).w, m.w)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        m.save(path)
    m.save(path, overwrite=True)


def test_untrained_model_refuses_to_save(tmp_path):
    m = _Toy([1.0])
    m.is_trained_ = False
    with pytest.raises(RuntimeError, match="not trained"):
        m.save(tmp_path / "x.stimg")


class _Boom:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    canary = tmp_path / "pwned"
    boom = _Boom()
    boom.target = str(canary)
    evil = tmp_path / "evil.stimg"
    evil.write_bytes(pickle.dumps(boom))
    with pytest.raises(ValueError, match="never unpickles"):
        _Toy.load(evil)
    with pytest.raises(ValueError, match="never unpickles"):
        _base.load_model(evil)
    assert not canary.exists()
    import torch

    tpath = tmp_path / "evil.pt"
    torch.save({"x": boom}, tpath)
    with pytest.raises(ValueError, match="never unpickles"):
        _Toy.load(tpath)
    assert not canary.exists()


def test_truncated_foreign_and_mismatched_files(tmp_path):
    path = _Toy(np.arange(1000)).save(tmp_path / "toy.stimg")
    cut = tmp_path / "cut.stimg"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        _Toy.load(cut)
    text = tmp_path / "notes.txt"
    text.write_text("hello world, not a model")
    with pytest.raises(ValueError, match="not a readable stimg model file"):
        _Toy.load(text)
    with pytest.raises(FileNotFoundError, match="not found"):
        _Toy.load(tmp_path / "missing.stimg")
    with pytest.raises(IsADirectoryError):
        _Toy.load(tmp_path)

    class _Other(_Toy):
        pass

    with pytest.raises(ValueError, match="holds a _Toy, not a _Other"):
        _Other.load(path)


def test_newer_format_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(_base, "FORMAT_VERSION", 99)
    path = _Toy([1.0]).save(tmp_path / "new.stimg")
    monkeypatch.setattr(_base, "FORMAT_VERSION", 1)
    with pytest.raises(ValueError, match="newer than this stimg"):
        _Toy.load(path)


def test_resolve_train_indices():
    a = AnnData(np.zeros((5, 2), np.float32))
    a.obs["si_sampled"] = [True, False, True, False, False]
    a.obs["label"] = ["x"] * 5
    np.testing.assert_array_equal(_base.resolve_train_indices(a, None), np.arange(5))
    np.testing.assert_array_equal(_base.resolve_train_indices(a, "si_sampled"), [0, 2])
    np.testing.assert_array_equal(_base.resolve_train_indices(a, np.array([3, 1, 3])), [1, 3])
    np.testing.assert_array_equal(_base.resolve_train_indices(a, a.obs["si_sampled"].to_numpy()), [0, 2])
    with pytest.raises(KeyError, match="'nope' not found"):
        _base.resolve_train_indices(a, "nope")
    with pytest.raises(TypeError, match="must be boolean"):
        _base.resolve_train_indices(a, "label")
    with pytest.raises(ValueError, match="selects no spot"):
        _base.resolve_train_indices(a, np.zeros(5, bool))
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        _base.resolve_train_indices(a, [7])
    with pytest.raises(ValueError, match="one entry per spot"):
        _base.resolve_train_indices(a, np.ones(3, bool))


def test_train_defaults_follow_settings(monkeypatch):
    import stimg as si

    monkeypatch.setattr(si.settings, "seed", 7)
    monkeypatch.setattr(si.settings, "accelerator", "cpu")
    d = _base.train_defaults()
    assert (d.accelerator, d.devices, d.seed) == ("cpu", "auto", 7)
    assert _base.train_defaults("gpu", 2, 3) == _base.TrainDefaults("gpu", 2, 3)


def test_embedding_provenance_and_check():
    a = AnnData(np.zeros((4, 2), np.float32))
    a.obsm["X_enc"] = np.zeros((4, 8), np.float32)
    a.uns["X_enc"] = {"params": {"encoder": "enc", "encoder_identity": "abc", "patch_um": 112.0, "patch_px": 224}}
    prov = _base.embedding_provenance(a, "X_enc")
    assert prov["encoder"] == "enc" and prov["dim"] == 8 and prov["patch_um"] == 112.0
    assert _base.check_embedding(a, prov) == "X_enc"
    b = a.copy()
    b.uns["X_enc"]["params"]["encoder_identity"] = "other"
    with pytest.raises(ValueError, match="encoder_identity"):
        _base.check_embedding(b, prov)
    c = AnnData(np.zeros((4, 2), np.float32))
    c.obsm["X_enc"] = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="5 features but the model was trained on 8"):
        _base.check_embedding(c, prov)
    with pytest.raises(KeyError, match="si.pp.embed"):
        _base.check_embedding(AnnData(np.zeros((4, 2), np.float32)), prov)


def test_safetensors_header_length_starting_with_0x80_is_not_taken_for_pickle(tmp_path):
    """A header of 128 + 256·j bytes makes the file's first byte 0x80, pickle's magic byte."""
    for pad in range(0, 300):
        m = _Toy([1.0, 2.0])
        m.note = "x" * pad
        path = tmp_path / f"t{pad}.stimg"
        _base.write_model_file(path, model_class="_Toy", header={"genes": ["A", "B"], "pad": m.note},
                               tensors={"w": m.w})
        if path.read_bytes()[:1] == b"\x80":
            np.testing.assert_array_equal(_Toy.load(path).w, m.w)
            return
    pytest.fail("no header length starting with 0x80 was produced")
