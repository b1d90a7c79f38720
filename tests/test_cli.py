from __future__ import annotations

import os

import pytest

from stimg.cli import main


def test_help_documents_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--sections", "--test-section", "--encoder", "--n-genes", "--out", "--no-progress", "--patch-um"):
        assert opt in out
    assert main([]) == 2  # no command: a usage error (issue 14)


def test_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--sections", "C6", "--test-section", "C6", "--out", str(tmp_path)]) == 2
    assert "training section" in capsys.readouterr().err


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("STIMG_RUN_DEMO"), reason="set STIMG_RUN_DEMO=1 (or run .ci/run_demo.sh)")
def test_demo_end_to_end_reduced(datadir, tmp_path, capsys):
    """Two real sections, 64-px patches, 5 genes: the full path of `stimg demo` in seconds."""
    rc = main(["demo", "--sections", "C5", "C6", "--n-genes", "5", "--patch-px", "64", "--out", str(tmp_path),
               "--no-progress", "--quiet", "--n-show", "2", "--datadir", str(datadir)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mean PCC over genes" in out and "top-10 genes by PCC" in out
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "demo_C6_spatial.png").stat().st_size > 10_000
    assert list((tmp_path / "feature_cache").glob("*.npz"))
