"""Sphinx configuration of the payne_lite documentation.

Build (offline; what tests/test_docs.py runs, warnings as errors):

    python -m sphinx -W --keep-going -E -b html docs docs/_build/html

Pages are Markdown (MyST); the API reference is autodoc + napoleon over the Google
style docstrings. Nothing here touches the network: no intersphinx, no remote images,
no theme downloads (alabaster ships with Sphinx).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# the checkout's package, whichever payne_lite is installed
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
# importing payne_lite must not write JAX's compilation cache into the user's home
# while the docs build
os.environ.setdefault("PAYNE_LITE_COMPILATION_CACHE", "off")

import payne_lite  # noqa: E402

project = "payne_lite"
author = "payne_lite developers"
copyright = "payne_lite developers"  # noqa: A001
release = version = payne_lite.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "payne_docs",  # docs/_ext/payne_docs.py: the API pages and the QA-bit table
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
# `## Heading` -> #heading anchors, as GitHub makes them (the pages read on GitHub too)
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
# types in signatures stay as written (no import of optional extras to resolve them)
autodoc_type_aliases: dict[str, str] = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" sections as :ivar: fields, not attribute entries that would duplicate
# the ones autodoc makes for dataclass and NamedTuple fields
napoleon_use_ivar = True

html_theme = "alabaster"
html_title = f"payne_lite {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Fit stellar spectra with neural-network emulators"
}
