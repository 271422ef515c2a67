"""The reliability suite: every fault scenario against real processes, as one table.

    make faults                      # = .venv/bin/python bench/faults.py
    python bench/faults.py -k dvc    # extra arguments go to pytest

Runs the tests marked `fault` (tests/faults.py says how a scenario records itself), then
prints and writes `reports/faults.md`: scenario, fault, expected, observed, lost, result.
The last line: `faults: N scenarios, N passed, N failed, N lost`, where "lost" counts the
scenarios that lost any run, metric, checkpoint or output. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/faults.py: the loss kinds

from faults import LOSSES  # noqa: E402


@dataclass
class Row:
    scenario: str
    fault: str
    expected: str
    test: str
    observed: str = ""
    lost: dict[str, int] = field(default_factory=dict)
    outcome: str = "not run"
    seconds: float = 0.0

    def lost_text(self) -> str:
        if not self.lost:
            return "not measured" if self.outcome != "passed" else "nothing"
        parts = [f"{n} {kind}" for kind, n in self.lost.items() if n]
        return ", ".join(parts) or "nothing"

    def lost_any(self) -> bool:
        return any(self.lost.values())


class Collect:
    """A pytest plugin: one Row per fault test, from its marker and user properties."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            mark = item.get_closest_marker("fault")
            if mark is None:
                continue
            scenario = mark.args[0] if mark.args else mark.kwargs["scenario"]
            self.rows[item.nodeid] = Row(scenario, mark.kwargs.get("fault", ""), mark.kwargs.get("expected", ""),
                                         item.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = self.rows.get(report.nodeid)
        if row is None:
            return
        row.seconds += report.duration
        props = dict(report.user_properties)
        row.observed = props.get("observed", row.observed)
        row.lost = props.get("lost", row.lost)
        if report.failed:
            row.outcome = "failed"
        elif report.skipped and row.outcome == "not run":
            row.outcome = "skipped"
        elif report.when == "call" and report.passed and row.outcome == "not run":
            row.outcome = "passed"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    lines = ["| scenario | fault | expected | observed | lost | result | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in (
            r.scenario, r.fault, r.expected, r.observed or "-", r.lost_text(), r.outcome, f"{r.seconds:.0f}")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "faults.md")
    args, pytest_args = parser.parse_known_args(argv)
    collect = Collect()
    start = time.perf_counter()
    status = pytest.main(["-m", "fault", "-p", "no:cacheprovider", "-q", *pytest_args, str(ROOT / "tests")],
                         plugins=[collect])
    wall = time.perf_counter() - start
    rows = sorted(collect.rows.values(), key=lambda r: (r.scenario, r.test))  # "1. ...", "2. ..."
    rows = [r for r in rows if r.outcome != "not run"]  # deselected by -k
    passed = sum(r.outcome == "passed" for r in rows)
    failed = sum(r.outcome == "failed" for r in rows)
    lost = sum(r.lost_any() for r in rows)
    body = table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Faults\n\n`python bench/faults.py` on {time.strftime('%Y-%m-%d')}, "
                        f"{wall / 60:.1f} min wall clock. Losses: {', '.join(LOSSES)}.\n\n{body}\n")
    print(body)
    print(f"written: {args.out}")
    print(f"faults: {len(rows)} scenarios, {passed} passed, {failed} failed, {lost} lost")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
