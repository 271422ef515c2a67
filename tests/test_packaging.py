"""The package installs from its own metadata: every third-party package `src/` imports is
declared in pyproject.toml's dependencies."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"pipeline"}
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "hydra": "hydra-core"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _normalize(name: str) -> str:
    """PEP 503: `PyYAML`, `pyyaml` and `py_yaml` name one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """Distribution names of the base dependencies (extras and markers stripped)."""
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", req).group()) for req in _pyproject()["project"]["dependencies"]}


def _top_level_imports(src: Path) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (lazy imports in functions included)."""
    found: dict[str, set[str]] = {}
    for file in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(file.relative_to(src.parent)))
    return found


def _third_party(src: Path) -> dict[str, set[str]]:
    return {name: files for name, files in _top_level_imports(src).items()
            if name not in sys.stdlib_module_names and name not in FIRST_PARTY}


def test_every_imported_package_is_a_declared_dependency():
    declared = _declared()
    missing = {name: sorted(files) for name, files in _third_party(REPO / "src").items()
               if _normalize(DISTRIBUTION.get(name, name)) not in declared}
    assert not missing, f"imported in src/ but not in pyproject.toml's dependencies: {missing}"


def test_the_import_scan_sees_lazy_and_from_imports(tmp_path):
    """The check above is only as good as the scan: a lazy `from x.y import z` in a function counts."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "import os\nfrom . import sibling\nimport pipeline.config\n"
        "def f():\n    from PIL.Image import open\n    import yaml, numpy as np\n")
    assert set(_third_party(tmp_path)) == {"PIL", "yaml", "numpy"}


def test_tuning_is_in_the_base_install():
    """`dvc repro` runs the tune stage: Ray Tune and Optuna cannot be an optional extra."""
    assert {"ray", "optuna"} <= _declared()
    assert any(req.startswith("ray[") and "tune" in req and "train" in req
               for req in _pyproject()["project"]["dependencies"])
