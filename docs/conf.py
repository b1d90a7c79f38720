# Sphinx configuration for stimg.
#
# Build (warnings are errors):  sphinx-build -W --keep-going -b html docs docs/_build/html
# or simply:                    docs/check.sh
from __future__ import annotations

import os
import shutil
import sys
import warnings
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))

# -- Project -----------------------------------------------------------------
project = "stimg"
author = "stimg developers"
copyright = f"{date.today():%Y}, {author}"
try:
    release = version("stimg")
except PackageNotFoundError:  # docs built from a tree without `pip install -e .`
    release = "0.0.0"
version = ".".join(release.split(".")[:2])

# -- Tutorials: copy ../tutorials/*.ipynb into docs/tutorials (git-ignored) ---
# The notebooks are committed executed; nothing is run at build time.
_TUTORIALS_SRC = HERE.parent / "tutorials"
_TUTORIALS_DST = HERE / "tutorials"


def _sync_tutorials() -> None:
    _TUTORIALS_DST.mkdir(exist_ok=True)
    wanted = {p.name: p for p in sorted(_TUTORIALS_SRC.glob("*.ipynb"))}
    for stale in _TUTORIALS_DST.iterdir():
        if stale.name not in wanted and stale.name != "_placeholder.md":
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for name, src in wanted.items():  # copy2 keeps mtimes, so unchanged notebooks are not re-read
        dst = _TUTORIALS_DST / name
        if not dst.exists() or dst.stat().st_mtime != src.stat().st_mtime or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    placeholder = _TUTORIALS_DST / "_placeholder.md"
    if wanted:
        placeholder.unlink(missing_ok=True)
    elif not placeholder.exists():  # keeps the glob toctree in tutorials.md non-empty
        placeholder.write_text("# Coming soon\n\nNo tutorial notebooks have been added yet.\n")


_sync_tutorials()

# Third-party noise only: sphinx-autodoc-typehints calls an API that Sphinx 9 deprecates.
warnings.filterwarnings("ignore", message=r".*set_application.* is deprecated")

# -- General -----------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings; must come before autodoc_typehints
    "sphinx_autodoc_typehints",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "stimg_api",  # docs/_ext: API tables and stub pages from each module's __all__
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "check.sh"]
templates_path: list[str] = []

# -- MyST / myst-nb ----------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "html_image", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # notebooks in tutorials/ are committed executed
nb_merge_streams = True
nb_output_stderr = "remove"  # logging/progress noise stays out of the rendered page

# -- autodoc / autosummary / napoleon ----------------------------------------
autosummary_generate = False  # stubs come from the stimg_api extension (docs/_ext)
autodoc_member_order = "bysource"
autodoc_default_options = {"member-order": "bysource"}
autodoc_inherit_docstrings = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_param = True
# stimg's Returns sections are prose (STYLE §2.7: types live in the signature), so render
# them as a plain "Returns" section; the return type comes from the annotation.
napoleon_custom_sections = ["Returns"]
typehints_defaults = None  # STYLE §2.7: defaults live in the signature only
typehints_document_rtype = True
always_use_bars_union = True

# -- Cross-references ----------------------------------------------------------
# Intersphinx needs the network to fetch inventories. Local builds (and .ci/run) stay
# offline; CI that has network sets STIMG_DOCS_INTERSPHINX=1 to turn the links on.
if os.environ.get("STIMG_DOCS_INTERSPHINX", "") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "torch": ("https://pytorch.org/docs/stable/", None),
    }
# Without inventories, references to third-party objects cannot resolve: nitpicky stays off.
nitpicky = False

# -- HTML --------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"stimg {release}"
html_theme_options = {
    "repository_url": "https://github.com/stimg/stimg",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "navigation_with_keys": False,
}
html_show_sourcelink = False
html_static_path = ["_static"]
