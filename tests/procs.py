"""The environment of the real DVC and pipeline processes the tests start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's: dvc, and the python DVC's stages run


def project_env() -> dict[str, str]:
    """This environment with the venv first on PATH (DVC runs `python -m ...` from there), no
    analytics, and a git identity for the commits `dvc exp run` makes."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    env.pop("VIRTUAL_ENV", None)
    return env
