"""The docs name only what exists: every ``si.<module>.<name>`` in README, docs/ and public docstrings resolves."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import stimg as si

ROOT = Path(__file__).resolve().parents[1]
# si.pp.embed, stimg.models.NBEnsemble.calibrate, :func:`stimg.tl.evaluate`, ~stimg.pl.spatial …
_REF = re.compile(r"(?<![\w./-])(?:si|stimg)((?:\.[A-Za-z_]\w*)+)")
_NAMESPACES = ("pp", "tl", "pl", "io", "datasets", "metrics", "models", "encoders")


def _resolves(path: str) -> bool:
    obj = si
    parts = path.strip(".").split(".")
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:  # a submodule not imported as an attribute (stimg.models._base)
                obj = importlib.import_module("stimg." + ".".join(parts[: i + 1]))
            except ImportError:
                return False
    return True


def _refs(text: str) -> set[str]:
    return {m.group(1) for m in _REF.finditer(text)}


def _public_docstrings():
    """(where, docstring) of every public function/class/method and of every public stimg module."""
    yield "stimg", si.__doc__ or ""
    for mod in pkgutil.walk_packages(si.__path__, "stimg."):
        if any(part.startswith("_") for part in mod.name.split(".")):
            continue  # private modules (and __main__) are not documented
        m = importlib.import_module(mod.name)
        yield mod.name, m.__doc__ or ""
    for ns in _NAMESPACES:
        module = getattr(si, ns)
        for name in module.__all__:
            obj = getattr(module, name)
            yield f"si.{ns}.{name}", inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, classmethod | property)):
                        yield f"si.{ns}.{name}.{attr}", inspect.getdoc(member) or ""


def _missing(texts) -> list[str]:
    out = []
    for where, text in texts:
        out += [f"{where}: si{ref}" for ref in sorted(_refs(text)) if not _resolves(ref)]
    return out


def test_checker_catches_a_missing_function():
    assert _resolves(".pp.embed") and _resolves(".models.NBEnsemble.calibrate") and _resolves(".models._base")
    assert _refs("call `si.tl.align(data)` then stimg.pl.nothing_here") == {".tl.align", ".pl.nothing_here"}
    assert _missing([("x", "si.tl.align_everything and si.pp.embed")]) == ["x: si.tl.align_everything"]
    assert _refs("see docs/si.pp.md or https://x.org/stimg.io") == set()  # paths and URLs are not references


def test_readme_and_docs_name_only_existing_functions():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = [(str(f.relative_to(ROOT)), f.read_text()) for f in files if f.exists()]
    assert texts and any("si.pp.embed" in t for _, t in texts)
    missing = _missing(texts)
    assert not missing, "the docs name functions that do not exist:\n" + "\n".join(missing)


@pytest.mark.filterwarnings("ignore")
def test_public_docstrings_name_only_existing_functions():
    missing = _missing(_public_docstrings())
    assert not missing, "docstrings name functions that do not exist:\n" + "\n".join(missing)
