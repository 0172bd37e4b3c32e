"""The API reference: every public name has a page entry, and it builds.

The build runs Sphinx with warnings as errors (``-W``), so a docstring that
does not render (a broken napoleon section, a bad math block, an unknown
substitution) fails the suite.
"""

import pathlib
import re
import subprocess
import sys

import pytest

import sal_jax as sal
from sal_jax import analysis
from sal_jax import baselines
from sal_jax import contrib
from sal_jax import emergence

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = {sal: "protect.rst", analysis: "analysis.rst",
         emergence: "emergence.rst", baselines: "baselines.rst",
         contrib: "contrib.rst"}


def _documented(page: str) -> set[str]:
  text = (DOCS / "api" / page).read_text()
  names = set(re.findall(
      r"^\.\. (?:autofunction|autoclass|autodata|data):: (\w+)", text,
      flags=re.M))
  # A `.. data::` directive may list further names on indented lines.
  names |= set(re.findall(r"^ {10}(\w+)$", text, flags=re.M))
  return names


@pytest.mark.parametrize("module", PAGES, ids=lambda m: m.__name__)
def test_every_public_name_is_on_its_page(module):
  documented = _documented(PAGES[module])
  assert set(module.__all__) <= documented, (
      set(module.__all__) - documented)
  assert documented <= set(module.__all__), (
      documented - set(module.__all__))


@pytest.mark.slow
def test_reference_builds_without_warnings(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
       str(tmp_path / "html")],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / "html" / "api" / "protect.html").exists()
