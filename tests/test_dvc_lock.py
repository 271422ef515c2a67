"""The repository carries the dvc.lock of its default pipeline, DVC's convention: `dvc exp run` on
a fresh clone then knows every output's hash (no "No file hash info found ... It won't be
created" per output, no "Generating lock file") and `dvc exp show` has a baseline. It must stay
current with what the stages run: the code deps (src/, conf/) and params.yaml. Checked here by
DVC's own comparison of each such dep with the lock (hashing a few hundred small files, no run);
the data deps are other stages' outputs, absent on a fresh clone, and not checked."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from procs import git_project, placeholder_outputs

REPO = Path(__file__).resolve().parents[1]
CODE = ("src/", "conf/")
FIX = "run `make lock` (dvc repro of the default pipeline) and commit dvc.lock"


def stale(root: Path) -> list[str]:
    """What in `root`'s dvc.lock no longer matches its dvc.yaml, code and params.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    problems: list[str] = []
    with Repo(str(root)) as repo:
        stages = {stage.name: stage for stage in repo.index.stages}
        problems += [f"{name}: not in dvc.lock" for name in sorted(stages.keys() - locked.keys())]
        problems += [f"{name}: in dvc.lock only" for name in sorted(locked.keys() - stages.keys())]
        for name in sorted(stages.keys() & locked.keys()):
            stage = stages[name]
            if stage.changed_stage():
                problems.append(f"{name}: its command changed")
            listed = {str(dep.def_path) for dep in stage.deps if not isinstance(dep, ParamsDependency)}
            in_lock = {dep["path"] for dep in locked[name].get("deps", [])}
            problems += [f"{name}: {path} not in dvc.lock" for path in sorted(listed - in_lock)]
            problems += [f"{name}: {path} in dvc.lock only" for path in sorted(in_lock - listed)]
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency) or (str(dep.def_path).startswith(CODE)
                                                         and str(dep.def_path) in in_lock):
                    problems += [f"{name}: {path} {change}" for path, change in dep.status().items()]
    return problems


def test_the_committed_dvc_lock_is_current():
    problems = stale(REPO)
    assert not problems, f"dvc.lock is out of date; {FIX}:\n  " + "\n  ".join(problems)


def test_a_changed_source_file_or_param_makes_the_lock_stale(tmp_path, monkeypatch):
    from dvc.repo import Repo

    git_project(tmp_path, leave_out=("tests/", "bench/"), commit=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "DVC_NO_ANALYTICS", "1")
    with Repo(str(tmp_path)) as repo:  # a lock current with this tree, over placeholder outputs
        placeholder_outputs(repo)
        repo.commit(force=True)
    assert stale(tmp_path) == []
    with (tmp_path / "src/pipeline/tasks/tune.py").open("a") as f:
        f.write("# a comment is a change too: DVC hashes bytes\n")
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text().replace("\nseed: 42\n", "\nseed: 43\n", 1))
    problems = stale(tmp_path)
    assert "tune: src/pipeline/tasks/tune.py modified" in problems, problems
    assert not [p for p in problems if p.startswith("fetch:")], problems  # fetch imports neither
    assert any(p.startswith("tune: params.yaml") and "'seed': 'modified'" in p for p in problems), problems
