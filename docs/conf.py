"""Sphinx configuration of the sal_jax API reference.

Build: ``python -m sphinx -W -b html docs docs/_build/html``.
"""

import pathlib
import sys

# The reference documents the checkout it sits in, installed or not.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import sal_jax  # noqa: E402

project = "sal_jax"
author = "sal_jax authors"
copyright = "sal_jax authors"  # noqa: A001
version = release = sal_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
]

# Result folders and figures of the README live beside the sources; they are
# not pages of the reference.
exclude_patterns = [
    "_build",
    "continual",
    "drift_budget",
    "finetune_lm",
    "overhead",
    "*.png",
]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
html_static_path = []
