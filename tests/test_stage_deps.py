"""Each DVC stage's code deps are exactly the project files its command imports, so `dvc repro`
re-runs a stage whenever code it runs changes (and only then)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.cli.deps import check, import_closure, stage_roots, write
from procs import git_project, placeholder_outputs

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_lists_every_file_each_stage_imports_and_no_other():
    problems = check(REPO / "dvc.yaml")
    assert not problems, "run `make deps`:\n" + "\n".join(problems)


def test_every_stage_runs_project_code():
    """Otherwise check() would skip a stage and pass without looking at it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all(stage_roots(stage["cmd"]) for stage in stages.values())


def test_stage_roots():
    # A stage runs its task, then prints its summary (pipeline.cli.summaries); fetch has none.
    assert stage_roots("python -m pipeline.cli.stages train") == \
        ["pipeline.cli.stages", "pipeline.tasks.train", "pipeline.cli.summaries"]
    assert stage_roots("/venv/bin/python3 -m pipeline.cli.stages fetch params.yaml") == \
        ["pipeline.cli.stages", "pipeline.tasks.data"]
    assert stage_roots("python -m pkg.main") == ["pkg.main"]
    assert stage_roots("cp a b") == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A tiny package, src/pkg, whose entry point `pkg.main` imports in every way Python can."""
    _write(tmp_path / "src", {
        "pkg/__init__.py": '"""The package."""\n',
        "pkg/main.py": ("import json\nimport numpy\nfrom typing import TYPE_CHECKING\n\n"
                        "from pkg.a import sub, VALUE\n\n"
                        "if TYPE_CHECKING:\n    from pkg import typed\n\n\n"
                        "def run():\n    import pkg.lazy\n    return pkg.lazy\n"),
        "pkg/a/__init__.py": "VALUE = 1\n",
        "pkg/a/sub.py": "from . import rel\nfrom ..b import thing\n",
        "pkg/a/rel.py": "",
        "pkg/a/unused.py": "",
        "pkg/b.py": "thing = 2\n",
        "pkg/lazy.py": "",
        "pkg/typed.py": "",
        "unrelated.py": "",
    })
    return tmp_path / "src"


def _closure(src: Path) -> set[str]:
    return {p.as_posix() for p in import_closure(["pkg.main"], src)}


def test_closure_follows_an_import_inside_a_function(src):
    assert "src/pkg/lazy.py" in _closure(src)


def test_closure_counts_a_from_import_of_a_submodule(src):
    closure = _closure(src)
    assert "src/pkg/a/sub.py" in closure
    assert "src/pkg/a/unused.py" not in closure  # imported by nobody; VALUE is an attribute


def test_closure_includes_the_packages_an_import_runs(src):
    assert {"src/pkg/__init__.py", "src/pkg/a/__init__.py"} <= _closure(src)


def test_closure_follows_relative_imports(src):
    assert {"src/pkg/a/rel.py", "src/pkg/b.py"} <= _closure(src)


def test_closure_includes_type_checking_imports(src):
    """A superset is the safe side: at worst a stage re-runs for a file it only names in annotations."""
    assert "src/pkg/typed.py" in _closure(src)


def test_closure_leaves_out_modules_not_in_the_project(src):
    assert _closure(src) == {"src/pkg/__init__.py", "src/pkg/main.py", "src/pkg/a/__init__.py", "src/pkg/a/sub.py",
                             "src/pkg/a/rel.py", "src/pkg/b.py", "src/pkg/lazy.py", "src/pkg/typed.py"}
    assert import_closure(["pkg.main"], src) == sorted(import_closure(["pkg.main"], src), key=Path.as_posix)


def test_closure_of_a_module_that_does_not_exist_raises(src):
    with pytest.raises(ModuleNotFoundError, match="pkg.missing"):
        import_closure(["pkg.missing"], src)


DVC_YAML = """\
# the pipeline
stages:
  run:
    cmd: python -m pkg.main
    deps:
      - src/pkg/main.py  # the entry point
      - data/input
      - src/pkg/a
      # data first, then the rest of the code
      - src/pkg/b.py
      - src/pkg/gone.py
    outs:
      - out
  fresh:
    cmd: python -m pkg.b
    outs:
      - out2
  shell:
    cmd: cp data/input out3
    deps:
      - src/pkg/a
"""


def test_check_names_the_stage_and_each_wrong_file(src):
    (src.parent / "dvc.yaml").write_text(DVC_YAML)
    problems = "\n".join(check(src.parent / "dvc.yaml"))
    assert "stage 'run': deps lack src/pkg/lazy.py" in problems
    assert "stage 'run': deps list src/pkg/a, which its command does not import (a folder" in problems
    assert "stage 'run': deps list src/pkg/gone.py" in problems
    assert "stage 'fresh': deps lack src/pkg/b.py" in problems
    assert "shell" not in problems  # not a Python module: its deps are not ours to judge


def test_write_makes_the_lists_exact_and_keeps_everything_else(src):
    dvc_yaml = src.parent / "dvc.yaml"
    dvc_yaml.write_text(DVC_YAML)
    assert write(dvc_yaml)
    assert check(dvc_yaml) == []
    text = dvc_yaml.read_text()
    stages = yaml.safe_load(text)["stages"]
    assert stages["run"]["deps"] == [*sorted(_closure(src)), "data/input"]
    assert stages["fresh"]["deps"] == ["src/pkg/__init__.py", "src/pkg/b.py"]
    assert stages["shell"]["deps"] == ["src/pkg/a"]
    assert "- src/pkg/main.py  # the entry point\n" in text
    assert "# the pipeline\n" in text and "      # data first, then the rest of the code\n" in text
    assert not write(dvc_yaml) and dvc_yaml.read_text() == text


@pytest.mark.integration
def test_dvc_status_sees_a_comment_added_to_any_file_a_stage_imports(tmp_path, monkeypatch):
    """The issue's cases, through DVC itself: a lock over placeholder outputs, then comments."""
    from dvc.repo import Repo

    git_project(tmp_path, leave_out=("tests/", "bench/"), commit=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "DVC_NO_ANALYTICS", "1")
    with Repo(str(tmp_path)) as repo:
        placeholder_outputs(repo)
        repo.commit(force=True)
        assert repo.status() == {}
    touched = ["src/pipeline/config.py", "src/pipeline/layout.py", "src/pipeline/tracking/mlflow_run.py",
               "src/pipeline/data/store.py"]
    for rel in touched:
        with (tmp_path / rel).open("a") as f:
            f.write("# a comment\n")
    with Repo(str(tmp_path)) as repo:
        status = repo.status()
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        closure = {p.as_posix() for p in import_closure(stage_roots(stage["cmd"]), tmp_path / "src")}
        changed = {dep for entry in status.get(name, []) for dep in entry.get("changed deps", {})}
        assert changed == set(touched) & closure, name
    assert "src/pipeline/data/store.py" in status["train"][0]["changed deps"]


def test_check_names_a_stage_whose_module_does_not_exist(src):
    (src.parent / "dvc.yaml").write_text("stages:\n  lost:\n    cmd: python -m pkg.missing\n")
    assert check(src.parent / "dvc.yaml") == [f"stage 'lost': pkg.missing is not a module under {src}"]
