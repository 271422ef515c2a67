"""Parsers for the original on-disk formats of the supported datasets.

Each parser turns one file (or one folder, for image folders) into numpy arrays and
raises DataError naming the file when it is truncated, corrupt or of the wrong kind.
They know nothing about downloads or checksums: that is ``sources.py``'s job.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

log = logging.getLogger(__name__)

_REPLACE = "delete it so it is downloaded again, or replace it with an intact copy"


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Read an (optionally gzipped) IDX file of unsigned bytes, as used by (Fashion-)MNIST."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut .gz raises EOFError
        raise DataError(f"{path} cannot be read ({e}); {_REPLACE}") from e
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(
            f"{path} is not an IDX file with magic number {magic} (found {found}); {_REPLACE}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; {_REPLACE}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{path} is {len(raw)} bytes but its header describes shape {list(dims)} "
            f"({expected} bytes): it is truncated or corrupt; {_REPLACE}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_pickle_dict(path: Path) -> dict[str, Any]:
    """Unpickle a CIFAR python batch; keys are returned as ``str`` whether stored as str or bytes.

    ``latin1`` decodes the Python 2 pickles of the official release (numpy arrays included).
    Only call this on files whose checksum was verified: unpickling runs arbitrary code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    # Corrupt pickle bytes can raise nearly any exception type, so catch broadly here.
    except Exception as e:
        raise DataError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); {_REPLACE}"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a dict as CIFAR batches do; {_REPLACE}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(path: Path, *, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR batch: rows of 3072 bytes (3 x 32 x 32, channel-first) -> NHWC uint8."""
    batch = read_pickle_dict(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path} lacks the 'data' or {label_key!r} entry; {_REPLACE}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: 'data' must be uint8 N x 3072, got {data.dtype}{list(data.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: {label_key!r} must be {data.shape[0]} integers, got {labels.shape}"
        )
    # Copy to C order now: np.concatenate would otherwise keep the transposed layout.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def read_cifar_classes(path: Path, *, key: str) -> list[str]:
    """Read class names (``label_names`` / ``fine_label_names``) from a CIFAR meta file."""
    names = read_pickle_dict(path).get(key)
    if not isinstance(names, list | tuple) or not names:
        raise DataError(f"{path} has no {key!r} list of class names; {_REPLACE}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN ``*_32x32.mat`` file: X is 32x32x3xN, y is Nx1 with 10 meaning digit 0."""
    import scipy.io  # imported lazily: only SVHN needs it and it is slow to import

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    # scipy raises ValueError, OSError, MatReadError, NotImplementedError... for bad files.
    except Exception as e:
        raise DataError(
            f"{path} is not a readable .mat file ({type(e).__name__}: {e}); {_REPLACE}"
        ) from e
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        shape = None if x is None else f"{x.dtype}{list(x.shape)}"
        raise DataError(f"{path} must hold X (uint8 32x32x3xN) and y, got X={shape}; {_REPLACE}")
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    if labels.shape[0] != x.shape[3]:
        raise DataError(
            f"{path}: y has {labels.shape[0]} labels for {x.shape[3]} images; {_REPLACE}"
        )
    labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be 1..10, got [{labels.min()}, {labels.max()}]")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of an image folder ``root``, sorted by name (hidden ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders: expected {root}/<class name>/<images>")
    return class_dirs


def list_class_files(class_dir: Path) -> list[str]:
    """The image files under ``class_dir`` (recursively, skipping hidden entries) as paths
    relative to it, sorted by their parts; at least one. Strings, not ``Path`` objects: a class
    of 100,000 images is held here at once (its names only) while a folder is listed."""
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        sub = os.path.relpath(dirpath, class_dir)
        for f in filenames:
            if not f.startswith("."):
                rel = f if sub == os.curdir else os.path.join(sub, f)
                (found if f.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(rel)
    if skipped:
        # Notes and label files beside the images are common (torchvision skips them too), but
        # images in a format not listed would vanish from the dataset: say which were left out.
        first = Path(min(skipped, key=_by_parts))
        log.warning("%s: skipped %d file(s) without an image extension (%s), e.g. %s; move them out of "
                    "the class folders, or convert them to PNG if they are images",
                    class_dir, len(skipped), ", ".join(IMAGE_EXTENSIONS), first.name)
    if not found:
        raise DataError(
            f"class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the folder"
        )
    found.sort(key=_by_parts)
    return found


def _by_parts(rel: str) -> str:
    # The separator as the smallest character orders joined paths as their parts tuples would
    # be ordered ("a/b" before "a-c", as ("a", "b") < ("a-c",)); no name can hold a NUL.
    return rel.replace(os.sep, "\0")


def list_class_images(class_dir: Path) -> list[Path]:
    """The image files under ``class_dir`` (``list_class_files``), as paths."""
    return [Path(class_dir, rel) for rel in list_class_files(class_dir)]


def image_mode(channels: int) -> str:
    """The Pillow mode images are converted to for ``channels`` (1: "L", else "RGB")."""
    return "L" if channels == 1 else "RGB"


def decode_image(path: Path, mode: str, size: int) -> np.ndarray:
    """One image file as uint8 pixels in Pillow ``mode``, resized to ``size`` squared."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # avoids Pillow's palette-transparency warning
            im = im.convert(mode)  # forces a full decode, so truncated files fail here
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path} cannot be decoded as an image ({type(e).__name__}: {e}); "
            "delete or replace the file"
        ) from e


def read_image_folder(
    root: Path, *, image_size: int, channels: int = 3, max_workers: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], list[Path]]:
    """Read ``root/<class>/<images>`` into (images NHWC uint8, labels, classes, files), in memory.

    Classes are the sorted sub-folder names; files are sorted within a class, so the
    order is deterministic. Images become "L" (channels=1) or "RGB" and are resized to
    ``image_size`` squared. Decoding runs in a thread pool: Pillow releases the GIL
    while decoding, so threads give real parallelism without pickling images around.
    The fetch streams instead (``imagefolder.fetch_image_folder``): same order, same pixels,
    never the whole array in memory.
    """
    class_dirs = class_folders(root)
    files: list[Path] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        images = list_class_images(class_dir)
        files += images
        labels += [index] * len(images)

    mode = image_mode(channels)
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)

    def decode_into(i: int) -> None:
        out[i] = decode_image(files[i], mode, image_size).reshape(image_size, image_size, channels)

    pool = ThreadPoolExecutor(max_workers=max_workers)
    try:
        for _ in pool.map(decode_into, range(len(files))):  # re-raises the first error
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error, skip the queued images
    return out, np.asarray(labels, dtype=np.int64), [p.name for p in class_dirs], files
