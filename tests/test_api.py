"""The public API: a small top level, namespaces by concept, old paths warn.

``sal_jax`` exports what a user of ``protect`` needs; the analysis tools,
the emergence field, the baselines and the Pulse-Split-Cascade live in
their namespaces. Names that moved keep resolving from their old path for
one release, with a ``DeprecationWarning`` that names the new one.
"""

import ast
import pathlib
import subprocess
import sys
import warnings

import pytest

import sal_jax as sal
from sal_jax import analysis
from sal_jax import baselines
from sal_jax import contrib
from sal_jax import emergence

PACKAGE = pathlib.Path(sal.__file__).parent
NAMESPACES = {"sal_jax": sal, "sal_jax.analysis": analysis,
              "sal_jax.baselines": baselines, "sal_jax.contrib": contrib,
              "sal_jax.emergence": emergence}


def test_top_level_is_small_and_versioned():
  assert len(sal.__all__) <= 30
  assert isinstance(sal.__version__, str)
  assert "protect" in sal.__all__ and "metrics" in sal.__all__


@pytest.mark.parametrize("module", sorted(NAMESPACES))
def test_all_names_resolve_and_are_unique(module):
  namespace = NAMESPACES[module]
  assert len(set(namespace.__all__)) == len(namespace.__all__)
  assert list(namespace.__all__) == sorted(namespace.__all__)
  for name in namespace.__all__:
    assert getattr(namespace, name) is not None, name


def test_no_name_is_exported_by_two_namespaces():
  seen = {}
  for module, namespace in NAMESPACES.items():
    for name in namespace.__all__:
      assert name not in seen, f"{name} in {seen.get(name)} and {module}"
      seen[name] = module


_ADDED_TO_EMERGENCE = ("CalibratedEmergence", "CalibratedFieldState",
                       "calibrated_init", "calibrated_observe")


def _moved():
  """(old module, name, new module) for every name that left a namespace."""
  moved = [("sal_jax", n, "sal_jax.analysis") for n in analysis.__all__]
  # The calibrated field was added to sal_jax.emergence; it never moved.
  moved += [("sal_jax", n, "sal_jax.emergence") for n in emergence.__all__
            if n not in _ADDED_TO_EMERGENCE]
  moved += [("sal_jax.contrib", n, "sal_jax.baselines")
            for n in baselines.__all__]
  return moved


@pytest.mark.parametrize("old, name, new", _moved())
def test_old_path_warns_and_resolves_to_the_same_object(old, name, new):
  with pytest.warns(DeprecationWarning, match=f"{new}.{name}"):
    obj = getattr(NAMESPACES[old], name)
  assert obj is getattr(NAMESPACES[new], name)


def test_old_from_import_warns():
  with pytest.warns(DeprecationWarning, match="sal_jax.baselines.ewc"):
    from sal_jax.contrib import ewc  # noqa: F401
  with pytest.warns(DeprecationWarning, match="sal_jax.emergence.observe"):
    from sal_jax import observe  # noqa: F401


def test_unknown_names_still_raise_attribute_error():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(AttributeError, match="no_such_name"):
      sal.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="no_such_name"):
      contrib.no_such_name  # noqa: B018
    # New in a namespace, never at the top level: no old path to keep.
    with pytest.raises(AttributeError, match="calibrated_init"):
      sal.calibrated_init  # noqa: B018


def _modules():
  return sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize(
    "path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_short(path):
  assert len(path.read_text().splitlines()) <= 400


@pytest.mark.parametrize(
    "path", [p for p in _modules() if p.name == "__init__.py"],
    ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_inits_only_re_export(path):
  """A package's ``__init__`` holds imports, ``__all__``, ``__version__``
  and the table of moved names: no definitions."""
  tree = ast.parse(path.read_text())
  for node in tree.body:
    assert not isinstance(
        node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)), (
            f"{path}: defines {node.name}")


@pytest.mark.slow  # a fresh interpreter
def test_import_does_not_import_flax():
  """flax is an optional dependency (the examples' extra): the library
  detects nnx optimizers without importing it."""
  code = ("import sys, sal_jax, sal_jax.analysis, sal_jax.baselines, "
          "sal_jax.contrib, sal_jax.emergence; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'))")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"


# Each layer may import from itself and the layers listed for it, no more:
# the shared internals at the bottom, protect above them, the namespaces on
# top, the top-level package last.
_ALLOWED = {
    "_common": {"_common"},
    "_protect": {"_common", "_protect"},
    "analysis": {"_common", "_protect", "analysis"},
    "emergence": {"_common", "emergence"},
    "baselines": {"_common", "baselines"},
    "contrib": {"_common", "baselines", "contrib"},
}


@pytest.mark.parametrize(
    "path", [p for p in _modules() if p.parent != PACKAGE],
    ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
  layer = path.relative_to(PACKAGE).parts[0]
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      parts = node.module.split(".")
      if parts[0] != "sal_jax":
        continue
      # `from sal_jax import analysis` imports the layer it names.
      targets = ([parts[1]] if len(parts) > 1
                 else [alias.name for alias in node.names])
      for target in targets:
        assert target in _ALLOWED[layer], f"{path}: imports {target}"
