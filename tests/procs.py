"""The environment of the real DVC and pipeline processes the tests start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent  # the venv's: dvc, and the python DVC's stages run
REPO = Path(__file__).resolve().parents[1]


def project_env() -> dict[str, str]:
    """This environment with the venv first on PATH (DVC runs `python -m ...` from there), no
    analytics, and a git identity for the commits `dvc exp run` makes."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    env.pop("VIRTUAL_ENV", None)
    return env


def start_stage(stage: str, cfg, folder: Path, out: IO, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m pipeline.cli.stages <stage>` on the config `cfg` (saved as
    `<folder>/<stage>.yaml`), run in `folder` with its output to `out` (and `env` added to its
    environment): a stage to signal."""
    from omegaconf import OmegaConf

    params = folder / f"{stage}.yaml"
    OmegaConf.save(cfg, params)
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli.stages", stage, str(params)], cwd=folder,
                            env={**project_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until `ready()`; fails, with the end of `log`, if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def git_project(dest: Path, *, leave_out: Sequence[str] = (), commit: bool = True) -> Path:
    """A fresh git repository in `dest` holding this working tree's tracked (and new, not
    ignored) files, as a clean clone with the changes in hand would: what `dvc repro` and
    `dvc exp run` tests run in. Paths under `leave_out` (prefixes) are not copied; with
    `commit`, the copy is committed as the baseline."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(tuple(leave_out)):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    steps = [["git", "init", "-q"]] + ([["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]] if commit else [])
    for cmd in steps:
        subprocess.run(cmd, cwd=dest, env=project_env(), check=True, capture_output=True)
    return dest


def placeholder_outputs(repo) -> None:
    """A one-line file at every output of `repo`'s stages (a folder's inside it): outputs DVC
    can hash and commit to a lock without running the stages."""
    for stage in repo.index.stages:
        for out in stage.outs:
            path = Path(out.fs_path)
            target = path if path.suffix else path / "placeholder"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("placeholder\n")
