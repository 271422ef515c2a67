"""The package installs from its own metadata: every third-party package `src/` imports is
declared in pyproject.toml's dependencies, and a wheel installed outside the repository runs
`pipeline` with the conf/ it ships."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
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


def test_the_package_list_names_every_package_and_config_group():
    """pyproject lists packages by hand (conf/ maps into pipeline.conf): a package or config
    group missing from the list would be missing from the wheel."""
    src, conf = REPO / "src", REPO / "conf"
    code = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    groups = {".".join(("pipeline.conf", *d.relative_to(conf).parts)) for d in [conf, *conf.rglob("*")] if d.is_dir()}
    assert set(_pyproject()["tool"]["setuptools"]["packages"]) == code | groups


def test_config_dir_prefers_the_project_folder_then_this_checkout(tmp_path):
    from pipeline.config import config_dir

    (tmp_path / "conf").mkdir()  # a conf/ without config.yaml is no Hydra config folder
    assert config_dir(tmp_path) == REPO / "conf"
    (tmp_path / "conf" / "config.yaml").write_text("name: mine\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    assert config_dir(tmp_path / "sub") == tmp_path / "conf"


def _copy_source(dest: Path) -> Path:
    """What the wheel is built from, away from the worktree (a build writes build/ and egg-info)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_an_installed_wheel_runs_pipeline_with_its_packaged_conf(tmp_path):
    """Build the wheel, install it into a fresh folder and run `pipeline` from a folder with
    no checkout: it composes the conf/ inside the wheel. A project folder's own conf/ wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: the test venv's setuptools builds it, with no index to reach.
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"),
          str(_copy_source(tmp_path / "source"))], tmp_path, env)
    wheel, = (tmp_path / "dist").glob("cnn_pipeline-*.whl")
    site = tmp_path / "site"
    # --no-deps: the dependencies are this venv's; only the project itself is new.
    _run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)], tmp_path, env)
    env["PYTHONPATH"] = str(site)
    pipeline = str(site / "bin" / "pipeline")
    (work := tmp_path / "work").mkdir()  # no dvc.yaml or conf/ here or above

    out = _run([pipeline, "train", "--cfg", "all", "model=lenet5"], work, env)
    packaged = site / "pipeline" / "conf"
    assert f"path: {packaged}" in out  # hydra.runtime.config_sources: the main source
    assert str(REPO) not in out
    assert "name: lenet5" in out and "activation: tanh" in out  # the composed model group
    assert "lenet5" in _run([pipeline, "models", "--input", "1x8x8"], work, env)

    # A user's project (dvc.yaml beside its own conf/) composes its conf/, not the packaged one.
    project = tmp_path / "project"
    shutil.copytree(packaged, project / "conf")
    (project / "dvc.yaml").write_text("stages: {}\n")
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("\nname: default\n", "\nname: my-own-conf\n"))
    (project / "sub").mkdir()
    out = _run([pipeline, "train", "--cfg", "job"], project / "sub", env)
    assert "name: my-own-conf" in out
