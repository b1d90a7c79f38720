"""Sphinx extension: API tables generated from each module's ``__all__`` at build time.

In a MyST page::

    ```{stimg-api} stimg.pp
    ```

expands to an :mod:`sphinx.ext.autosummary` table (with a toctree) over every name in
``stimg.pp.__all__``. A target that is not a module (e.g. ``stimg.settings``) gives a
one-row table. The stub page of every listed object is (re)written into
``docs/generated/`` on ``builder-inited``, so a function a colleague adds to ``__all__``
shows up without editing the docs. Stale stubs are removed. A public name of
``stimg.__all__`` that no ``stimg-api`` directive covers is reported as a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

GENERATED = "generated"
PACKAGE = "stimg"
_DIRECTIVE_RE = re.compile(r"^[`:]{3,}\{stimg-api\}\s+(\S+)", re.MULTILINE)


def _resolve(target: str):
    """Return ``(kind, obj)``: ``("module", module)``, ``("object", obj)`` or ``("missing", None)``."""
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        return "module", importlib.import_module(target)  # import errors surface loudly
    modname, _, attr = target.rpartition(".")
    module = importlib.import_module(modname)
    if not hasattr(module, attr):
        return "missing", None
    return "object", getattr(module, attr)


def _entries(target: str) -> list[tuple[str, str]]:
    """``[(module, name), ...]`` documented for one directive target."""
    kind, obj = _resolve(target)
    if kind == "missing":
        return []
    if kind == "object":
        modname, _, name = target.rpartition(".")
        return [(modname, name)]
    names = getattr(obj, "__all__", None)
    if names is None:
        logger.info("stimg-api: %s has no __all__ yet; nothing to list", target)
        return []
    return [(target, name) for name in names if not inspect.ismodule(getattr(obj, name, None))]


def _stub(modname: str, name: str) -> str:
    full = f"{modname}.{name}"
    obj = getattr(importlib.import_module(modname), name)
    title = full.replace("_", r"\_")
    head = f"{title}\n{'=' * len(title)}\n\n.. currentmodule:: {modname}\n\n"
    if inspect.isclass(obj):
        opts = "   :members:\n   :show-inheritance:\n"
        if any(c.__module__.startswith("scvi.model") for c in obj.__mro__[1:]):
            opts += "   :inherited-members:\n"  # train/save/load/... come from scvi-tools
        return head + f".. autoclass:: {name}\n{opts}"
    if callable(obj):
        return head + f".. autofunction:: {name}\n"
    body = f".. autodata:: {name}\n"
    if _is_package_instance(obj):  # such as ``settings``
        body += "   :no-value:\n"
    return head + body


def _targets(srcdir: Path) -> dict[str, list[str]]:
    """``{docname: [target, ...]}`` for the top-level pages using the directive."""
    found: dict[str, list[str]] = {}
    for page in sorted(srcdir.glob("*.md")):
        if hits := _DIRECTIVE_RE.findall(page.read_text(encoding="utf-8")):
            found[page.stem] = hits
    return found


def always_reread(app: Sphinx, env, added, changed, removed) -> list[str]:
    """Re-read the API pages every build: ``__all__`` may change without the page changing."""
    return [doc for doc in _targets(Path(app.srcdir)) if doc in env.found_docs]


def generate_stubs(app: Sphinx) -> None:
    """Write ``generated/<module>.<name>.rst`` for every documented object."""
    srcdir = Path(app.srcdir)
    outdir = srcdir / GENERATED
    outdir.mkdir(exist_ok=True)
    targets = [t for hits in _targets(srcdir).values() for t in hits]
    wanted: dict[Path, str] = {}
    for target in targets:
        for modname, name in _entries(target):
            try:
                wanted[outdir / f"{modname}.{name}.rst"] = _stub(modname, name)
            except Exception as exc:  # e.g. a name in __all__ that does not exist
                logger.warning("stimg-api: cannot document %s.%s: %r", modname, name, exc)
    for path, text in wanted.items():  # rewrite only on change: keeps incremental builds fast
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    for path in outdir.glob("*.rst"):
        if path not in wanted:
            path.unlink()

    top = importlib.import_module(PACKAGE)
    covered = {t.split(".")[1] for t in targets if t.count(".") >= 1}
    for name in getattr(top, "__all__", []):
        if name not in covered:
            logger.warning("stimg-api: %s.%s is public but no {stimg-api} directive lists it", PACKAGE, name)


def _is_package_instance(obj) -> bool:
    return not inspect.isclass(obj) and not callable(obj) and type(obj).__module__.split(".")[0] == PACKAGE


def tidy_docstring(app: Sphinx, what: str, name: str, obj, options, lines: list[str]) -> None:
    """Runs after napoleon. Two fixes for module-level data.

    * A constant without its own doc comment would show its type's docstring
      (``tuple``'s, for ``HER2ST_SECTIONS``): drop it.
    * An instance such as ``settings`` documents its attributes with napoleon's
      ``.. attribute:: x``, which would be filed as ``stimg.x``: file it as
      ``stimg.settings.x`` so ``:attr:`stimg.settings.x``` resolves.
    """
    if what != "data":
        return
    if not _is_package_instance(obj):
        own = inspect.cleandoc(type(obj).__doc__ or "")
        if own and "\n".join(lines).strip() == own.strip():
            lines[:] = []
        return
    short = name.rpartition(".")[2]
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)\.\. attribute:: (\w+)\s*$", line)
        if m:
            lines[i] = f"{m[1]}.. attribute:: {short}.{m[2]}"


def drop_object_base(app: Sphinx, name: str, obj, options, bases: list) -> None:
    """``Bases: object`` says nothing."""
    bases[:] = [b for b in bases if b is not object]


class StimgApi(SphinxDirective):
    """``{stimg-api} <module or object>`` (MyST pages only): autosummary over ``__all__``."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        target = self.arguments[0]
        entries = _entries(target)
        if not entries:
            para = nodes.paragraph(text="Nothing public here yet.")
            return [para]
        # MyST parses nested content as Markdown, so wrap the reST in an eval-rst fence.
        lines = ["```{eval-rst}", f".. currentmodule:: {PACKAGE}", "", ".. autosummary::"]
        lines += [f"   :toctree: {GENERATED}", "   :nosignatures:", ""]
        lines += ["   " + f"{mod}.{name}".removeprefix(f"{PACKAGE}.") for mod, name in entries]
        lines.append("```")
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), 0, node)
        return node.children


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx.ext.autosummary")
    app.connect("builder-inited", generate_stubs)
    app.connect("env-get-outdated", always_reread)
    app.connect("autodoc-process-docstring", tidy_docstring, priority=600)  # after napoleon
    app.connect("autodoc-process-bases", drop_object_base)
    app.add_directive("stimg-api", StimgApi)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
