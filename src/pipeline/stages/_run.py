"""Shared entry-point plumbing: read params.yaml, call the task, turn user errors into exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import load_params
from pipeline.errors import PipelineError


def run_stage(task: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """Run `task(params.yaml)`; a `PipelineError` prints its message (no traceback) and exits 2."""
    params = argv[0] if argv else "params.yaml"
    try:
        task(load_params(params))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
