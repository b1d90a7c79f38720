"""Shared fixtures: real HER2ST data (from STIMG_DATA_DIR), synthetic data, the accelerator option."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--accelerator", default="cpu", help="accelerator for model tests: cpu, cuda, auto")


@pytest.fixture(scope="session")
def accelerator(request) -> str:
    return request.config.getoption("--accelerator")


def _datadir() -> Path | None:
    env = os.environ.get("STIMG_DATA_DIR")
    path = Path(env) if env else _DEFAULT_DATA
    return path if (path / "her2st").is_dir() else None


@pytest.fixture(scope="session")
def datadir() -> Path:
    path = _datadir()
    if path is None:
        pytest.skip("real HER2ST data not found: set STIMG_DATA_DIR to the shared data folder")
    return path


@pytest.fixture(autouse=True)
def _stimg_settings(monkeypatch):
    """Point stimg at the real data when present and keep progress bars quiet in tests."""
    import stimg as si

    path = _datadir()
    monkeypatch.setattr(si.settings, "_datadir", path)
    monkeypatch.setattr(si.settings, "progress", False)
    yield


@pytest.fixture(scope="session")
def c2_sdata(datadir):
    """HER2ST C2 as SpatialData (read once per session; tests must not modify it)."""
    import stimg as si

    si.settings.datadir = datadir
    return si.datasets.her2st("C2")


@pytest.fixture(scope="session")
def her2st_c_adata(datadir):
    """HER2ST C2–C6 as AnnData (counts only, no images; read once per session)."""
    import stimg as si

    si.settings.datadir = datadir
    return si.datasets.her2st(["C2", "C3", "C4", "C5", "C6"], image=False, as_anndata=True)
