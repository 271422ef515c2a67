"""The fault scenarios' record: what each saw and lost, for `bench/faults.py`'s table.

A scenario is an ordinary test marked `@pytest.mark.fault(scenario, fault=..., expected=...)`
that takes the `observe` fixture (conftest) and says what happened and what was lost:

    @pytest.mark.fault("Training process killed", fault="SIGTERM mid-epoch",
                       expected="exit 143, run KILLED, last.ckpt loadable")
    def test_...(observe):
        ...
        observe.saw(f"exit {status}, run {run_status}")
        observe.lost(runs=..., metrics=..., checkpoints=..., outputs=...)  # then assert none

`pytest -m fault` runs every scenario; the bench's plugin reads the marker and the
`user_properties` these calls write (pytest's `record_property`), so the table and the
tests are the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LOSSES = ("runs", "metrics", "checkpoints", "outputs")


class Observed:
    """One scenario's observations, kept as pytest user properties of the test."""

    def __init__(self, record_property: Callable[[str, Any], None]) -> None:
        self._record = record_property
        self._seen: list[str] = []

    def saw(self, text: str) -> None:
        """Add a phrase to the 'observed' column (call as facts come in; they join with '; ')."""
        self._seen.append(text)
        self._record("observed", "; ".join(self._seen))

    def lost(self, **counts: int) -> dict[str, int]:
        """What the fault lost, by kind (runs, metrics, checkpoints, outputs); returns the
        counts so the test can assert them. Kinds not given count as nothing lost."""
        unknown = set(counts) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown loss kinds {sorted(unknown)}: use {', '.join(LOSSES)}")
        full = {kind: int(counts.get(kind, 0)) for kind in LOSSES}
        self._record("lost", full)
        return full
