import logging

import pytest

import stimg as si
from stimg._utils import StimgWarning


def test_warning_points_at_the_users_line():
    ad = si.datasets.synthetic(16, 5, as_anndata=True)
    ad.uns["spatial"]["S0"]["images"]["hires"][:] = 250
    with pytest.warns(StimgWarning, match="No tissue detected") as rec:
        si.pp.tissue_coverage(ad)
    assert rec[0].filename == __file__


def test_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("STIMG_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(si.settings, "_datadir", None)
    assert si.settings.datadir == tmp_path
    si.settings.datadir = tmp_path / "x"
    assert si.settings.datadir == tmp_path / "x"
    with pytest.raises(ValueError, match="verbosity"):
        si.settings.verbosity = 7
    old = si.settings.verbosity
    si.settings.verbosity = 3
    assert logging.getLogger("stimg").level == logging.DEBUG
    si.settings.verbosity = old
    assert "datadir" in repr(si.settings)


def test_one_logger_logs_each_field_written(caplog):
    ad = si.datasets.synthetic(16, 5, as_anndata=True)
    logger = logging.getLogger("stimg")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="stimg"):
            si.pp.tissue_coverage(ad)
    finally:
        logger.removeHandler(caplog.handler)
    assert any("obs['tissue_coverage']" in r.getMessage() for r in caplog.records)
    assert ad.uns["tissue_coverage"]["params"]["working_mpp"] == 4.0


def test_namespaces():
    for mod in ("pp", "tl", "pl", "io", "datasets", "metrics"):
        assert getattr(si, mod).__all__
    with pytest.raises(AttributeError):
        si.nope  # noqa: B018
