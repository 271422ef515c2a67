"""Which checkpoint a retried trial resumes from (`pipeline.tuning.recovery`), on real folders
laid out as Ray Tune's storage lays them out; the sweep that needs it is in test_tune.py
(`test_trial_lost_before_its_checkpoint_commit_resumes_from_it`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.tuning.recovery import CKPT_FILE, META_FILE, REPORTED_FILE, resume_checkpoint

TRIAL = "run_trial_abc_00000_0_lr=0.003"
DRIVER = "d" * 32


def _checkpoint(trial: Path, index: int, epoch: int) -> Path:
    folder = trial / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    torch.save({"epoch": epoch, "weights": torch.arange(1000.0)}, folder / CKPT_FILE)
    (folder / META_FILE).write_text(json.dumps({"lr": 0.003, "epoch": epoch}))
    return folder


def _record(trial: Path, index: int, epoch: int, driver: str = DRIVER) -> None:
    (trial / REPORTED_FILE).write_text(json.dumps({"checkpoint": f"checkpoint_{index:06d}", "epoch": epoch,
                                                   "driver": driver}))


@pytest.fixture
def trial(tmp_path: Path) -> Path:
    """A trial folder whose commit is epoch 0 (checkpoint 0) and whose epoch-1 checkpoint
    (checkpoint 1) is whole in storage but was never committed."""
    folder = tmp_path / "sweep" / TRIAL
    _checkpoint(folder, 0, 0)
    _checkpoint(folder, 1, 1)
    return folder


def _committed(trial: Path, index: int = 0):
    from ray import tune

    return tune.Checkpoint.from_directory(str(trial / f"checkpoint_{index:06d}"))


def _resume(trial: Path, committed, driver: str = DRIVER):
    from pyarrow.fs import LocalFileSystem

    return resume_checkpoint(committed, LocalFileSystem(), str(trial), driver)


def _resumed(trial: Path, committed=None, driver: str = DRIVER) -> str:
    return Path(_resume(trial, committed or _committed(trial), driver).path).name


def test_the_newer_checkpoint_of_a_result_the_driver_took_is_resumed(trial: Path):
    _record(trial, 1, 1)
    assert _resumed(trial) == "checkpoint_000001"


def test_without_a_record_or_with_the_commit_newest_the_commit_is_resumed(trial: Path):
    assert _resumed(trial) == "checkpoint_000000"  # nothing recorded
    _record(trial, 0, 0)
    assert _resumed(trial) == "checkpoint_000000"  # the usual case: recorded = committed
    _record(trial, 1, 1)
    assert _resumed(trial, _committed(trial, 1)) == "checkpoint_000001"


def test_an_earlier_drivers_record_is_ignored(trial: Path):
    """A resumed sweep's restored state is older than what its dead driver recorded (and
    logged): resuming past it would leave epochs out of the new driver's results."""
    _record(trial, 1, 1, driver="e" * 32)
    assert _resumed(trial) == "checkpoint_000000"


def test_a_pbt_clone_never_jumps_ahead_in_its_donors_folder(tmp_path: Path):
    donor = tmp_path / "sweep" / "run_trial_abc_00001_1_lr=0.01"
    _checkpoint(donor, 0, 0)
    _checkpoint(donor, 1, 1)
    _record(donor, 1, 1)
    clone = tmp_path / "sweep" / TRIAL
    clone.mkdir()
    _record(clone, 1, 1)  # even if the clone had a record of its own
    assert Path(_resume(clone, _committed(donor, 0)).path) == donor / "checkpoint_000000"  # not its own folder


@pytest.mark.parametrize("damage", ["cut", "other epoch", "no meta", "gone"])
def test_a_damaged_or_overwritten_checkpoint_falls_back_to_the_commit(trial: Path, damage: str):
    _record(trial, 1, 1)
    newer = trial / "checkpoint_000001"
    if damage == "cut":  # a persist cut short: the zip's directory at its end is missing
        data = (newer / CKPT_FILE).read_bytes()
        (newer / CKPT_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "other epoch":  # overwritten by the next epoch's checkpoint since
        (newer / META_FILE).write_text(json.dumps({"lr": 0.003, "epoch": 2}))
    elif damage == "no meta":
        (newer / META_FILE).unlink()
    else:
        for f in newer.iterdir():
            f.unlink()
        newer.rmdir()
    assert _resumed(trial) == "checkpoint_000000"


def test_a_first_start_has_nothing_to_resume(tmp_path: Path):
    assert _resume(tmp_path / "sweep" / TRIAL, None) is None  # no folder yet
    (tmp_path / "sweep" / TRIAL).mkdir(parents=True)
    assert _resume(tmp_path / "sweep" / TRIAL, None) is None  # a folder, nothing recorded


def test_a_trial_lost_before_its_first_commit_resumes_from_its_recorded_checkpoint(tmp_path: Path):
    """Lost after the driver took its first result but before Tune committed that result's
    checkpoint: Tune hands the retry no checkpoint and it would train epoch 0 again."""
    folder = tmp_path / "sweep" / TRIAL
    _checkpoint(folder, 0, 0)
    _record(folder, 0, 0)
    assert Path(_resume(folder, None).path).name == "checkpoint_000000"
    _record(folder, 0, 0, driver="e" * 32)
    assert _resume(folder, None) is None  # an earlier driver's record
    _record(folder, 0, 0)
    (folder / "checkpoint_000000" / META_FILE).write_text(json.dumps({"lr": 0.003, "epoch": 1}))
    assert _resume(folder, None) is None  # not the epoch recorded
