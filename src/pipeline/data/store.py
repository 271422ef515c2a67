"""The canonical on-disk dataset format that every source is converted into.

A fetched dataset is one directory holding:

* ``images.npy``   uint8, N x H x W x C (NHWC, like PIL / numpy images)
* ``labels.npy``   int64, N, values in [0, num_classes)
* ``classes.json`` list of class names; label ``i`` means ``classes[i]``
* ``manifest.json`` what the folder holds plus a sha256 of every data file

Plain ``.npy`` files (never pickles) are used so that later stages can load them with
``allow_pickle=False`` and memory-map them, and so that DVC hashes stable bytes. The
manifest has no timestamps or absolute paths, so the same input gives byte-identical
output and ``dvc repro`` does not see spurious changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import verified
from pipeline.data.residency import choose_in_memory
from pipeline.errors import DataError
from pipeline.files import replacing_folder

log = logging.getLogger(__name__)

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
CLASSES_FILE = "classes.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

_REQUIRED_KEYS = ("dataset", "num_samples", "image_shape", "num_classes", "classes", "files")


def _fix(raw_dir: Path) -> str:
    return f"re-run `dvc repro fetch` (or delete {raw_dir}) to fetch it again"


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class RawDataset:
    """A dataset loaded from its canonical folder."""

    images: np.ndarray  # uint8, N x H x W x C; a read-only np.memmap when memory-mapped
    labels: np.ndarray  # int64, N
    classes: list[str]
    manifest: dict

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def file_digest(path: Path, algorithm: str = "sha256", chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks so large datasets do not need to fit twice in RAM.

    These are integrity checks, not security (md5 is what torchvision publishes for its
    downloads), so ``usedforsecurity=False`` keeps md5 usable on FIPS-restricted builds.
    """
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _validate(images: Any, labels: Any, classes: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(
            f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}"
        )
    if images.ndim != 4 or images.shape[0] == 0 or 0 in images.shape[1:]:
        raise DataError(f"images must be a non-empty N x H x W x C array, got shape {images.shape}")
    if images.shape[3] not in (1, 3, 4):
        raise DataError(
            f"images must be channels-last with C in (1, 3, 4), got shape {images.shape}"
        )
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise DataError(
            f"labels must be an integer numpy array, got {getattr(labels, 'dtype', type(labels))}"
        )
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"labels must have shape ({images.shape[0]},) to match images, got {labels.shape}"
        )
    if not isinstance(classes, list | tuple) or not classes:
        raise DataError("classes must be a non-empty list of class names")
    classes = list(classes)
    if not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise DataError(f"classes must be unique non-empty strings, got {classes!r}")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(
            f"labels must be in [0, {len(classes)}) for {len(classes)} classes, "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    # Integer labels of another width are accepted: the range check above makes the cast lossless.
    return np.ascontiguousarray(images), labels.astype(np.int64, copy=False), classes


def _fsync_write(path: Path, write) -> dict[str, Any]:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": file_digest(path), "bytes": path.stat().st_size}


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    info = _fsync_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return {**info, "shape": list(array.shape), "dtype": str(array.dtype)}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def check_output(out_dir: Path, dataset: Any, source: dict | None) -> dict:
    """The checks of a dataset's name, source info and output folder before anything is written;
    returns the source info as a plain dict."""
    if not isinstance(dataset, str) or not dataset:
        raise DataError(f"dataset must be a non-empty name, got {dataset!r}")
    source = dict(source or {})
    try:
        json.dumps(source)
    except (TypeError, ValueError) as e:
        raise DataError(f"source info for {dataset!r} must be JSON-serialisable: {e}") from e
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(
            f"{out_dir} exists and is not a directory; remove it or choose another output"
        )
    return source


def _write_rest(
    folder: Path, images_info: dict, shape: tuple[int, ...], labels: np.ndarray, classes: list[str],
    dataset: str, source: dict,
) -> dict:  # fmt: skip
    """Labels, classes and (last) the manifest beside an images.npy described by ``images_info``."""
    files = {
        IMAGES_FILE: images_info,
        LABELS_FILE: _save_npy(folder / LABELS_FILE, labels),
        CLASSES_FILE: _fsync_write(folder / CLASSES_FILE, lambda f: f.write(_json_bytes(classes))),
    }
    counts = np.bincount(labels, minlength=len(classes))
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "num_samples": int(shape[0]),
        "image_shape": [int(s) for s in shape[1:]],
        "num_classes": len(classes),
        "classes": classes,
        "class_counts": {c: int(n) for c, n in zip(classes, counts, strict=True)},
        "files": files,
        "source": source,
    }
    # The manifest is written last: a folder with a manifest is a complete folder.
    _fsync_write(folder / MANIFEST_FILE, lambda f: f.write(_json_bytes(manifest)))
    return manifest


def write_raw(
    out_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    dataset: str,
    source: dict | None = None,
) -> dict:
    """Validate and atomically write a dataset to ``out_dir``; return its manifest.

    Raises DataError on invalid inputs, in which case ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    images, labels, classes = _validate(images, labels, classes)
    source = check_output(out_dir, dataset, source)
    # Written into a hidden sibling folder that replaces out_dir only once complete.
    with replacing_folder(out_dir) as tmp:
        images_info = _save_npy(tmp / IMAGES_FILE, images)
        manifest = _write_rest(tmp, images_info, images.shape, labels, classes, dataset, source)
    return manifest


def complete_raw(
    folder: Path, labels: np.ndarray, classes: list[str], *, dataset: str, source: dict | None = None
) -> dict:
    """Complete a dataset folder whose ``images.npy`` was written in place (the streamed fetch
    fills it chunk by chunk): validate, then write labels, classes and the manifest exactly as
    ``write_raw`` does; return the manifest. Moving the folder into place is the caller's."""
    folder = Path(folder)
    path = folder / IMAGES_FILE
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)  # the header, not the pixels
    except (ValueError, OSError) as e:
        raise DataError(f"{path} cannot be read as a .npy array ({e})") from e
    _, labels, classes = _validate(images, labels, classes)
    shape, dtype = images.shape, str(images.dtype)
    del images  # unmapped before the digest reads the file
    source = check_output(folder, dataset, source)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written through memory maps: on disk before the manifest vouches for it
    finally:
        os.close(fd)
    images_info = {"sha256": file_digest(path), "bytes": path.stat().st_size, "shape": list(shape), "dtype": dtype}
    return _write_rest(folder, images_info, shape, labels, classes, dataset, source)


def read_manifest(raw_dir: Path) -> dict:
    """Load ``manifest.json`` from a dataset folder (DataError if missing or malformed)."""
    raw_dir = Path(raw_dir)
    path = raw_dir / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found: {raw_dir} is not a fetched dataset or its fetch was interrupted; "
            + _fix(raw_dir)
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); " + _fix(raw_dir)) from e
    missing = [k for k in _REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing or not isinstance(manifest["files"], dict):
        raise DataError(f"{path} is malformed (missing {missing or ['files']}); " + _fix(raw_dir))
    return manifest


def _check_file(raw_dir: Path, name: str, meta: Any, verify: bool, record: dict, hashed: dict[str, str]) -> Path:
    path = raw_dir / name
    # Names come from the manifest; refuse anything that could point outside the folder.
    if Path(name).name != name or not isinstance(meta, dict):
        raise DataError(
            f"{raw_dir / MANIFEST_FILE} lists an invalid entry {name!r}; " + _fix(raw_dir)
        )
    if not path.is_file():
        raise DataError(f"{path} is missing (listed in {MANIFEST_FILE}); " + _fix(raw_dir))
    if verify:
        size = path.stat().st_size
        if "bytes" in meta and size != meta["bytes"]:
            raise DataError(
                f"{path} has {size} bytes but the manifest says {meta['bytes']}: it is truncated "
                "or was modified; " + _fix(raw_dir)
            )
        if verified.still_verified(record, path, meta.get("sha256")):
            return path  # hashed before, and not changed since (pipeline.data.verified)
        actual = file_digest(path)
        if actual != meta.get("sha256"):
            raise DataError(
                f"{path} sha256 mismatch (manifest {meta.get('sha256')}, file {actual}): it is "
                "corrupt or was modified; " + _fix(raw_dir)
            )
        hashed[name] = actual
    return path


def _load_npy(path: Path, meta: dict, raw_dir: Path, *, mmap: bool = False) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read as a .npy array ({e}); " + _fix(raw_dir)) from e
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} is not a single .npy array; " + _fix(raw_dir))
    if list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
        raise DataError(
            f"{path} holds {array.dtype}{list(array.shape)} but the manifest says "
            f"{meta.get('dtype')}{meta.get('shape')}; " + _fix(raw_dir)
        )
    return array


def read_raw(raw_dir: Path, *, verify: bool = True, in_memory: bool | str = True) -> RawDataset:
    """Load a dataset folder written by ``write_raw``.

    With ``verify`` every listed file's size and sha256 are checked first (a file hashed
    before and unchanged since is not hashed again: ``pipeline.data.verified``). Structural
    checks (shapes, dtypes, label range) always run. Every problem raises DataError naming
    the offending file and how to fix it. The images are read into memory, or memory-mapped
    read-only with ``in_memory=False``, or either as ``pipeline.data.residency`` chooses for
    their size with ``in_memory="auto"`` (the labels are always read).
    """
    raw_dir = Path(raw_dir)
    manifest = read_manifest(raw_dir)
    files = manifest["files"]
    for name in (IMAGES_FILE, LABELS_FILE, CLASSES_FILE):
        if name not in files:
            raise DataError(f"{raw_dir / MANIFEST_FILE} does not list {name}; " + _fix(raw_dir))
    record = verified.load(raw_dir) if verify else {}
    hashed: dict[str, str] = {}  # files hashed by this load, which all matched
    paths = {name: _check_file(raw_dir, name, meta, verify, record, hashed) for name, meta in files.items()}
    if hashed:
        verified.remember(raw_dir, record, hashed)

    keep, why = choose_in_memory(in_memory, paths[IMAGES_FILE].stat().st_size)
    log.info("%s: %s", raw_dir, why)
    images = _load_npy(paths[IMAGES_FILE], files[IMAGES_FILE], raw_dir, mmap=not keep)
    labels = _load_npy(paths[LABELS_FILE], files[LABELS_FILE], raw_dir)
    try:
        classes = json.loads(paths[CLASSES_FILE].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{paths[CLASSES_FILE]} is not valid JSON ({e}); " + _fix(raw_dir)) from e

    if classes != manifest["classes"] or len(classes) != manifest["num_classes"]:
        raise DataError(f"{paths[CLASSES_FILE]} does not match {MANIFEST_FILE}; " + _fix(raw_dir))
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or list(images.shape[1:]) != manifest["image_shape"]
    ):
        raise DataError(
            f"{paths[IMAGES_FILE]} must be uint8 N x {manifest['image_shape']}, got "
            f"{images.dtype}{list(images.shape)}; " + _fix(raw_dir)
        )
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise DataError(
            f"{paths[LABELS_FILE]} must be int64 of length {images.shape[0]}, got "
            f"{labels.dtype}{list(labels.shape)}; " + _fix(raw_dir)
        )
    if images.shape[0] != manifest["num_samples"]:
        raise DataError(
            f"{paths[IMAGES_FILE]} sample count differs from the manifest; " + _fix(raw_dir)
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(
            f"{paths[LABELS_FILE]} has labels outside [0, {len(classes)}); " + _fix(raw_dir)
        )
    return RawDataset(images=images, labels=labels, classes=classes, manifest=manifest)
