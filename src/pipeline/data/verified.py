"""Remembering which dataset files were hashed and matched their manifest, so that a load need
not read a multi-gigabyte `images.npy` whole just to hash it, only to then read a few batches.

Once a file's sha256 matches the manifest, that hash is recorded beside the dataset folder
(`<folder>/../.<name>.verified.json`) with what identifies this version of the file: device,
inode, size, and modification and status-change times in nanoseconds. A later load skips the
hash while all of them are unchanged and the manifest still names that hash. Any write through
the file system moves the times (the status-change time cannot be set back), and a fetch
replaces the files (new inodes), so a record never vouches for bytes other than those it hashed.
What it cannot see is damage below the file system (a failing disk), which only a re-hash finds:
delete the record to force one. DVC trusts file stats the same way to skip re-hashing its outputs.
As git does for its index, a file changed in the last `RACY_S` seconds is not recorded: a second
change within the same timestamp tick could leave its times as they were.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipeline.errors import OutputError
from pipeline.files import write_text

log = logging.getLogger(__name__)

RACY_S = 2.0


def record_path(folder: Path) -> Path:
    """Where `folder`'s record lives: beside it, so the folder itself (a DVC output) is untouched."""
    return folder.parent / f".{folder.name}.verified.json"


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def load(folder: Path) -> dict:
    """The files of `folder` recorded as verified ({} when there is no readable record)."""
    try:
        record = json.loads(record_path(folder).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def still_verified(record: dict, path: Path, sha256: str) -> bool:
    """Whether `record` says `path`, exactly as it is now, was hashed and matched `sha256`."""
    entry = record.get(path.name)
    return (isinstance(entry, dict) and entry.get("sha256") == sha256
            and entry.get("identity") == _identity(path))


def remember(folder: Path, record: dict, hashed: dict[str, str]) -> None:
    """Add the files just `hashed` ({name: sha256 that matched}) to `folder`'s record, if they
    are old enough to be trusted by their times; best effort (a read-only dataset stays unrecorded)."""
    now = time.time_ns()
    fresh = {}
    for name, sha256 in hashed.items():
        identity = _identity(folder / name)
        if now - max(identity[3], identity[4]) > RACY_S * 1e9:
            fresh[name] = {"sha256": sha256, "identity": identity}
    if not fresh:
        return
    try:
        write_text(record_path(folder), json.dumps({**record, **fresh}, indent=2) + "\n")
    except (OSError, OutputError) as err:  # a read-only or full disk: the check itself was done
        log.debug("could not record the verified files of %s: %s", folder, err)

