"""Where a retried trial resumes: the newest checkpoint whose result the driver took.

Ray Tune (2.60) takes a trial's result and commits the checkpoint reported with it in two
calls to the trial: the result first (the MLflow callback logs it, schedulers act on it),
then a save that registers the checkpoint. A trial lost between the two (its node gone, its
process killed) is retried from the commit before, and would train and report that epoch
again: the MLflow run would hold the epoch twice and the work would be done twice, although
the checkpoint was already whole in storage (a trial persists it before it reports).

So the driver records, for every result it takes, the checkpoint folder reported with it
(`RecordReported`, in the trial's storage folder), and a retried trial resumes from that
checkpoint when it is newer than the one Tune committed, in the same trial's folder (a
PBT-cloned trial restores from another trial's folder and is left alone), and whole.
Only a result this driver took counts: a checkpoint persisted without its result reaching
the driver is not used, or its epoch would never be logged; nor one recorded by an earlier
driver of a resumed sweep (`tune.resume=true`), whose restored state is older than its record.
"""

from __future__ import annotations

import json
import logging
import uuid
import zipfile
from pathlib import PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

REPORTED_FILE = "reported.json"  # {"checkpoint": "checkpoint_000003", "epoch": 3}
CKPT_FILE = "last.ckpt"
META_FILE = "trial_meta.json"  # beside the checkpoint: the lr it was trained with and its epoch
_DRIVER = uuid.uuid4().hex  # this process, as a driver


def driver_id() -> str:
    """This process's mark on its records (a module function, so that Tune's pickled callback
    of a resumed sweep calls it in the new driver rather than keeping the old value)."""
    return _DRIVER


def record_reported_callback() -> Any:
    """A Tune callback that writes each result's checkpoint folder name and epoch into its
    trial's storage folder as the driver takes the result (a temporary file, then a move, so
    a reader never sees half a record). Listed after the MLflow callback: a recorded epoch
    has been logged."""
    from ray.tune import Callback

    class RecordReported(Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            name = result.get("checkpoint_dir_name")
            if not name or "epoch" not in result:
                return
            fs, folder = trial.storage.storage_filesystem, trial.storage.trial_fs_path
            final = f"{folder}/{REPORTED_FILE}"
            temp = f"{final}.{trial.trial_id}.tmp"
            try:
                with fs.open_output_stream(temp) as out:
                    out.write(json.dumps({"checkpoint": name, "epoch": int(result["epoch"]),
                                          "driver": driver_id()}).encode())
                fs.move(temp, final)
            except OSError as err:  # a retry then resumes from the commit before: one epoch again
                log.warning("could not record the checkpoint of trial %s's result in %s: %s", trial.trial_id,
                            folder, err)

    return RecordReported()


def resume_checkpoint(committed: Any, fs: Any, trial_path: str, driver: str) -> Any:
    """The checkpoint a (re)started trial resumes from: `committed` (Tune's
    `get_checkpoint()`, None before the first commit), or the newer one that the sweep's
    `driver` recorded for this trial's latest result in `trial_path` (the trial's folder on the
    storage filesystem `fs`), when `committed` is not another trial's (a PBT clone's donor),
    the newer one holds the epoch recorded, and its files are whole."""
    from pyarrow.fs import FileType
    from ray import tune

    folder = PurePosixPath(trial_path)
    here = PurePosixPath(committed.path) if committed is not None else None
    if here is not None and here.parent.name != folder.name:
        return committed  # a PBT clone of another trial's checkpoint
    try:
        with fs.open_input_file(str(folder / REPORTED_FILE)) as f:
            reported = json.loads(f.read())
        name, epoch = str(reported["checkpoint"]), int(reported["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return committed  # nothing recorded: a first start, or no result taken yet
    if reported.get("driver") != driver:
        return committed  # an earlier driver's record
    if not name.startswith("checkpoint_") or (here is not None and name <= here.name):
        return committed  # the commit is the newest: the usual case
    # Lost before its first commit too: then Tune would start the trial over from nothing.
    candidate = tune.Checkpoint(str(folder / name), filesystem=fs)
    if fs.get_file_info(candidate.path).type != FileType.Directory:
        return committed
    try:
        with candidate.as_directory() as local:
            with open(f"{local}/{META_FILE}") as f:
                meta = json.load(f)
            with zipfile.ZipFile(f"{local}/{CKPT_FILE}") as archive:  # torch.save writes a zip
                whole = archive.testzip() is None
    except (OSError, ValueError, zipfile.BadZipFile):
        return committed
    if not whole or int(meta.get("epoch", -1)) != epoch:
        return committed  # overwritten since, or cut short: the commit is safe
    log.info("resuming from %s (epoch %d), which Tune had not committed when the trial stopped", name, epoch)
    return candidate
