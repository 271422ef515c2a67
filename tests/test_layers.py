"""The package's shape: layers that hold (import-linter's contract in pyproject.toml), no
private names across packages, no module shadowing the standard library, and the one place
where errors and signals become exit statuses."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import exits
from pipeline.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted((SRC / "pipeline").rglob("*.py"))


def _package(path: Path) -> str:
    """`pipeline.tuning` for src/pipeline/tuning/trial.py, `pipeline.config` for config.py."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:2])


def test_the_import_layers_hold() -> None:
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], capture_output=True,
                            text=True, cwd=SRC.parent)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "0 broken" in result.stdout


def test_no_private_name_is_imported_from_another_package() -> None:
    offenders = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                other = ".".join(node.module.split(".")[:2])
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and other != _package(path):
                    offenders.append(f"{path.relative_to(SRC)}: {node.module} {private}")
    assert not offenders, offenders


def test_no_module_shadows_the_standard_library() -> None:
    shadowing = [str(p.relative_to(SRC)) for p in MODULES if p.stem in sys.stdlib_module_names]
    assert not shadowing


def test_a_user_error_exits_2_with_its_message(capsys) -> None:
    def bad() -> None:
        raise ConfigError("model.name='x' is not one of: a, b.")

    assert exits.run(bad) == 2
    assert capsys.readouterr().err == "error: model.name='x' is not one of: a, b.\n"


def test_sigint_exits_130_and_sigterm_143_after_cleaning_up() -> None:
    cleaned = []

    def signalled(signum: int) -> None:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises long before this ends
        finally:
            cleaned.append(signum)

    before = signal.getsignal(signal.SIGTERM)
    # Python's own SIGINT handler, whatever an earlier test left (Ray Tune installs its own).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert exits.run(lambda: signalled(signal.SIGINT)) == exits.INTERRUPTED == 130
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert exits.run(lambda: signalled(signal.SIGTERM)) == exits.TERMINATED == 143
    assert cleaned == [signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before  # restored afterwards


def test_a_bug_is_not_turned_into_a_status() -> None:
    with pytest.raises(ZeroDivisionError):
        exits.run(lambda: 1 / 0)
