"""The image-folder fetch, streamed: ``root/<class>/<images>`` into the canonical dataset
folder (``store.py``) without ever holding the images in memory.

1. List. Class folders sorted, files sorted within a class (``read_image_folder``'s order),
   one class's names in memory at a time (as strings), written to a listing file with each
   file's size and modification time. Today's checks run here, before anything is decoded: no class folders,
   an empty class folder.
2. Decode and write. ``images.npy`` is created at its full size (``open_memmap``), with the
   space reserved up front so that a full disk fails at once, not with SIGBUS mid-way. Chunks
   of about 1 MiB are mapped one at a time and filled by a pool of decoding threads, at most
   ``IN_FLIGHT`` chunks at once, so memory does not grow with the number of images.
3. Publish. Labels, classes and the manifest exactly as ``write_raw`` writes them (the folder
   is byte for byte the in-memory path's), then one atomic rename onto ``out_dir``.

Resuming. An unfinished fetch lives in a hidden sibling of ``out_dir``, ``.<name>.partial/``:

    plan.json      what is being fetched: shape, classes and counts, the listing's sha256
    listing.jsonl  [path relative to root, bytes, mtime_ns] per image, in dataset order
    done.json      {"images": k}: images 0..k-1 are on disk (synced before this is written)
    out/           becomes out_dir: images.npy while decoding, the rest at publish

Progress is saved about every second and when a signal stops the fetch; a rerun with the
same image size and channels over an unchanged folder (same names, sizes and modification
times) continues from the saved image, anything else starts over. A bad image or a full disk
is the user's to fix: as on the in-memory path, nothing is left behind, partial state included.

Threads, not processes: Pillow releases the GIL while it decodes and resizes, so large photos
decode in parallel; the pixels go straight into the mapped chunk (nothing is pickled between
processes); and a fetch killed with SIGKILL leaves no orphaned worker writing into the file a
rerun resumes. Small images (32x32 PNGs) are bound by Pillow's per-file Python work under the
GIL; a process pool did not decode them faster on this shared 2-core machine (bench/README.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np

from pipeline.data import formats
from pipeline.data.store import IMAGES_FILE, check_output, complete_raw
from pipeline.errors import DataError
from pipeline.files import NO_ROOM, no_room, swap_folder, write_text

log = logging.getLogger(__name__)

PARTIAL_VERSION = 1  # of the partial folder's layout: a rerun of another version starts over
CHUNK_BYTES = 1 << 20  # one mapped chunk: about 340 images of 32x32 RGB
MAX_CHUNK_ROWS = 512  # tiny images still advance the saved progress in steps
IN_FLIGHT = 2  # chunks queued at once: the threads decode one while the next waits its turn
SAVE_S = 1.0  # progress is saved at least this often (and when a signal stops the fetch)
PROGRESS_S = 10.0  # one progress line this often

PLAN, LISTING, DONE, OUT = "plan.json", "listing.jsonl", "done.json", "out"
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def partial_folder(out_dir: Path) -> Path:
    """Where an unfinished fetch of ``out_dir`` keeps its state: a hidden sibling."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


def fetch_image_folder(
    root: Path, out_dir: Path, *, image_size: int, channels: int, dataset: str, source: dict,
    workers: int | None = None, progress_s: float = PROGRESS_S,
) -> dict:  # fmt: skip
    """Stream ``root/<class>/<images>`` into ``out_dir`` (resuming an interrupted fetch of the
    same folder); return the manifest. ``source`` is recorded in it with ``num_files`` added.
    ``workers`` decoding threads (default: one per CPU; at least one)."""
    root, out_dir = Path(root), Path(out_dir)
    source = check_output(out_dir, dataset, source)
    created = _missing_folders(out_dir.parent)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(out_dir.parent):
            return _fetch(root, out_dir, image_size, channels, dataset, source,
                          max(1, workers or os.cpu_count() or 1), progress_s)
    except BaseException:
        _remove_empty(created)
        raise


def _fetch(
    root: Path, out_dir: Path, image_size: int, channels: int, dataset: str, source: dict, workers: int,
    progress_s: float,
) -> dict:  # fmt: skip
    partial = partial_folder(out_dir)
    planned = False
    try:
        plan, done = _prepare(root, out_dir, image_size, channels)
        planned = True
        _decode_rest(partial, root, plan, done, workers, progress_s)
        labels = np.repeat(np.arange(len(plan["classes"]), dtype=np.int64), plan["counts"])
        manifest = complete_raw(partial / OUT, labels, plan["classes"], dataset=dataset,
                                source={**source, "num_files": plan["num_images"]})
        swap_folder(partial / OUT, out_dir)
    except BaseException as err:
        no_space = isinstance(err, OSError) and err.errno in NO_ROOM
        # A bad image or a full disk is the user's to fix: nothing half-written is left (and a
        # full disk needs the space back). A signal or a crash keeps the partial state to resume.
        if planned and (isinstance(err, DataError) or no_space):
            shutil.rmtree(partial, ignore_errors=True)
        if no_space:
            raise no_room(out_dir / Path(getattr(err, "filename", None) or IMAGES_FILE).name, err) from err
        raise
    shutil.rmtree(partial, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One image-folder fetch at a time into ``folder``: two would share (and wreck) one partial
    state. A lock on the folder itself, so no lock file is left behind; the kernel releases it
    when the process ends, however it ends."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another image-folder fetch into %s to finish", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # a filesystem without locks: go on unguarded, as before streaming
            log.debug("cannot lock %s (%s)", folder, err)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- listing and plan


def _prepare(root: Path, out_dir: Path, image_size: int, channels: int) -> tuple[dict, int]:
    """List the folder; return the plan and how many images are already on disk (resuming)."""
    partial = partial_folder(out_dir)
    # A fixed name (under the lock): a listing cut short by SIGKILL is overwritten by the next.
    listing = out_dir.parent / f".{out_dir.name}.listing.tmp"
    try:
        with open(listing, "wb") as f:
            classes, counts, digest = _write_listing(root, f)
        plan = {
            "version": PARTIAL_VERSION,
            "image_shape": [image_size, image_size, channels],
            "num_images": sum(counts),
            "classes": classes,
            "counts": counts,
            "listing_sha256": digest,
        }
        done = _resume_point(partial, plan)
        if done is not None:
            log.info("resuming the interrupted fetch of %s at image %d of %d (%s)", root, done,
                     plan["num_images"], partial)
            return plan, done
        if partial.exists():
            log.info("%s holds an interrupted fetch of other settings or of a folder changed since; "
                     "starting over", partial)
            shutil.rmtree(partial)
        try:
            _start(partial, listing, plan)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return plan, 0
    finally:
        listing.unlink(missing_ok=True)


def _write_listing(root: Path, out: IO[bytes]) -> tuple[list[str], list[int], str]:
    """Write one JSON line per image to ``out``; return the classes, their counts and the sha256."""
    digest = hashlib.sha256()
    classes, counts = [], []
    for class_dir in formats.class_folders(root):
        files = formats.list_class_files(class_dir)
        for rel in files:
            path = os.path.join(class_dir, rel)
            try:
                st = os.stat(path)
            except OSError as e:  # gone (or unreadable) since the folder was walked
                raise DataError(f"{path} cannot be read ({e.strerror}); if something is changing {root}, "
                                "let it finish, then fetch again") from e
            posix = rel if os.sep == "/" else rel.replace(os.sep, "/")
            line = (json.dumps([f"{class_dir.name}/{posix}", st.st_size, st.st_mtime_ns]) + "\n").encode()
            digest.update(line)
            out.write(line)
        classes.append(class_dir.name)
        counts.append(len(files))
        del files  # one class's names at a time
    return classes, counts, digest.hexdigest()


def _resume_point(partial: Path, plan: dict) -> int | None:
    """How many images an interrupted fetch of this very plan left on disk; None: start over."""
    try:
        old = json.loads((partial / PLAN).read_text(encoding="utf-8"))
        done = json.loads((partial / DONE).read_text(encoding="utf-8"))["images"]
        images = np.load(partial / OUT / IMAGES_FILE, mmap_mode="r", allow_pickle=False)
        shape, dtype = list(images.shape), images.dtype
        del images
    except (OSError, ValueError, KeyError, TypeError):  # missing, cut or not ours: start over
        return None
    n = plan["num_images"]
    if old != plan or dtype != np.uint8 or shape != [n, *plan["image_shape"]]:
        return None
    return done if isinstance(done, int) and 0 <= done <= n else None


def _start(partial: Path, listing: Path, plan: dict) -> None:
    """A fresh partial folder: the full-size images.npy, the listing, no progress, and the plan
    last (a folder without a plan is not resumable)."""
    (partial / OUT).mkdir(parents=True)
    path = partial / OUT / IMAGES_FILE
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                       shape=(plan["num_images"], *plan["image_shape"]))
    del images  # only the header is written; the pixels are mapped a chunk at a time
    _reserve(path)
    os.replace(listing, partial / LISTING)
    write_text(partial / DONE, json.dumps({"images": 0}))
    write_text(partial / PLAN, json.dumps(plan))


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now: writing a hole through a memory map on a full disk kills
    the process with SIGBUS; here it is an ENOSPC, which becomes an exit-2 message."""
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno in NO_ROOM:
            raise
        log.debug("cannot reserve space for %s (%s); writing it sparse", path, err)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- decoding


def _decode_rest(partial: Path, root: Path, plan: dict, done: int, workers: int, progress_s: float) -> None:
    """Decode images ``done``.. into the partial images.npy, saving progress on the way."""
    n = plan["num_images"]
    size, _, channels = plan["image_shape"]
    path = partial / OUT / IMAGES_FILE
    row = size * size * channels
    header = path.stat().st_size - n * row
    rows = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // row))
    mode = formats.image_mode(channels)
    progress = _Progress(partial, path, done, n, progress_s)
    log.info("fetching %d images in %d classes from %s: %d to decode, %d thread(s)", n,
             len(plan["classes"]), root, n - done, workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    inflight: deque[tuple[int, list[Future]]] = deque()
    try:
        with open(partial / LISTING, "rb") as listing:
            for _ in range(done):
                listing.readline()
            for start in range(done, n, rows):
                count = min(rows, n - start)
                paths = [root / json.loads(listing.readline())[0] for _ in range(count)]
                chunk = np.memmap(path, dtype=np.uint8, mode="r+", offset=header + start * row,
                                  shape=(count, size, size, channels))
                # A few slices per thread: an uneven mix of image sizes still spreads evenly.
                step = -(-count // (workers * 4))
                inflight.append((start + count, [
                    pool.submit(_decode_into, chunk, paths, lo, min(lo + step, count), mode, size)
                    for lo in range(0, count, step)]))
                del chunk  # unmapped once its last slice is decoded
                while len(inflight) >= IN_FLIGHT:
                    _retire(inflight, progress)
            while inflight:
                _retire(inflight, progress)
    except BaseException as err:
        pool.shutdown(wait=True, cancel_futures=True)
        if not isinstance(err, DataError):  # a stop or a crash: keep what is finished for the rerun
            for end, futures in inflight:
                if not all(f.done() and not f.cancelled() and f.exception() is None for f in futures):
                    break
                progress.done = end
            with contextlib.suppress(OSError):
                progress.save()
            log.warning("fetch stopped at image %d of %d; run it again to resume from there", progress.saved, n)
        progress.close()
        raise
    pool.shutdown(wait=True)
    progress.save()
    progress.close()
    progress.report(final=True)


def _decode_into(chunk: np.ndarray, paths: list[Path], lo: int, hi: int, mode: str, size: int) -> None:
    for i in range(lo, hi):
        chunk[i] = formats.decode_image(paths[i], mode, size).reshape(chunk.shape[1:])


def _retire(inflight: deque[tuple[int, list[Future]]], progress: _Progress) -> None:
    """Wait for the oldest chunk and count it; it leaves the queue only once counted, so a stop
    while waiting still finds it first (a later chunk never counts before it)."""
    end, futures = inflight[0]
    for future in futures:
        future.result()  # the first bad image's DataError is raised here
    progress.advance(end)
    inflight.popleft()


class _Progress:
    """Images on disk so far: saved (pixels synced, then ``done.json``) and reported."""

    def __init__(self, partial: Path, images: Path, done: int, total: int, every_s: float) -> None:
        self.partial, self.total, self.every_s = partial, total, every_s
        self.first = self.done = self.saved = done
        self.started = self.last_save = self.last_report = time.monotonic()
        self._fd = os.open(images, os.O_RDWR)

    def advance(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last_save >= SAVE_S:
            self.save()
        if now - self.last_report >= self.every_s:
            self.report()

    def save(self) -> None:
        if self.done == self.saved:
            return
        _fdatasync(self._fd)  # the pixels are on disk before the count that vouches for them
        write_text(self.partial / DONE, json.dumps({"images": self.done}))
        self.saved, self.last_save = self.done, time.monotonic()

    def report(self, final: bool = False) -> None:
        self.last_report = now = time.monotonic()
        decoded, elapsed = self.done - self.first, max(now - self.started, 1e-9)
        rate = decoded / elapsed
        if final:
            log.info("fetched %d images (%d decoded by this run) in %.1f s, %.0f images/s", self.total,
                     decoded, elapsed, rate)
            return
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        log.info("fetch: %d of %d images (%d%%), %.0f images/s, about %.0f s left", self.done, self.total,
                 100 * self.done // max(self.total, 1), rate, left)

    def close(self) -> None:
        os.close(self._fd)


# --------------------------------------------------------------------------- clean-up


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would create, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()

