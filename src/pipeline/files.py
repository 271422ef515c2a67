"""Writing output files atomically: a reader (DVC, a later stage, a person) finds either the
previous complete file or the new complete one, never a half-written one.

Each file is written to a hidden temporary file in its own folder (the same filesystem, so
the final `os.replace` is atomic), flushed and fsynced, then moved over the old one; on any
failure the temporary file is removed and the old file stays as it was. A full disk (or a
quota, or a file-size limit) becomes an `OutputError` naming the folder, so the command
exits 2 with the fix instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import OutputError

# Out of room on the output's disk: no space, a quota, a file-size limit (RLIMIT_FSIZE).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_room(path: Path | str, err: OSError) -> OutputError:
    """The user error for `err`, an OSError of `NO_ROOM` while writing `path`."""
    path = Path(path)
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "no space left: disk quota exceeded",
              errno.EFBIG: "no space for it: file size limit exceeded"}[err.errno]
    return OutputError(f"Could not write {path.name} in {path.parent}: {reason}. Free space there (or set "
                       f"paths.out_dir to a folder on a disk with room) and run again; the previous "
                       f"{path.name}, if there was one, is kept.")


@contextmanager
def replacing(path: Path | str) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content to; it replaces `path` only once the block
    ends without an error (flushed and fsynced first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in NO_ROOM:
            raise no_room(path, err) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Atomically write `path` by `write(file)` (e.g. `lambda f: np.save(f, array)`); returns `path`."""
    with replacing(path) as f:
        write(f)
    return Path(path)


def write_bytes(path: Path | str, data: bytes | memoryview) -> Path:
    """Atomically write `data` to `path`; returns `path`."""
    return write_with(path, lambda f: f.write(data))


def write_text(path: Path | str, text: str) -> Path:
    """Atomically write `text` (UTF-8) to `path`; returns `path`."""
    return write_bytes(path, text.encode("utf-8"))


@contextmanager
def replacing_folder(out_dir: Path | str) -> Iterator[Path]:
    """A new empty folder to fill; it replaces `out_dir` (a folder of files belonging
    together, such as a split's index files) only once the block ends without an error."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling: same filesystem (so the final rename is atomic) and ignored by globbing.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        swap_folder(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in NO_ROOM:
            # Named by where it was going, not by the temporary folder it was written in.
            raise no_room(out_dir / Path(err.filename).name if err.filename else out_dir, err) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_folder(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` folder to `out_dir`, replacing any previous one.

    `os.replace` cannot overwrite a non-empty directory, so the old one is first renamed
    aside and only deleted once the new one is in place; if the second rename fails the
    old one is put back. Both renames stay inside one parent directory, so they are atomic.
    """
    backup = None
    if out_dir.exists():
        backup = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, backup)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if backup is not None:
            os.replace(backup, out_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out a matplotlib figure, write it to ``path`` atomically (a full disk leaves the
    previous figure, not half of the new one; the format from the suffix) and close it, so
    figures do not pile up in memory across a long run; returns ``path``."""
    import matplotlib.pyplot as plt  # here: only the stages that draw pay for matplotlib

    fig.tight_layout()
    try:
        write_with(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110))
    finally:
        plt.close(fig)
    return path
