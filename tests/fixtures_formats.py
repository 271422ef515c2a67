"""Writers for TINY files in the real on-disk formats of the supported datasets.

Each writer returns the arrays it wrote and the md5 of every file, so tests can check an
exact round trip and pass ``checksums=`` to override torchvision's published md5 sums.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte data, last byte = number of dimensions
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    path = Path(str(path) + ".gz") if gz and not str(path).endswith(".gz") else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _idx_bytes(array)
    # mtime=0 makes the .gz bytes (and so the md5) deterministic.
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_idx_images(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write an N x rows x cols uint8 array as an IDX3 file (magic 2051); returns the path."""
    assert array.ndim == 3
    return _write_idx(path, array, gz)


def write_idx_labels(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write N labels as an IDX1 file (magic 2049); returns the path."""
    assert array.ndim == 1
    return _write_idx(path, array, gz)


def write_mnist_like(
    root: Path, folder: str, n_train: int, n_test: int, seed: int = 0, *, gz: bool = True
) -> dict:
    """Write the four (Fashion-)MNIST IDX files under ``root/folder/raw``.

    Returns {"images": all images N x 28 x 28 (train then test), "labels", "n_train",
    "n_test", "dir", "md5": {filename: md5}}.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    out: dict = {"dir": raw, "n_train": n_train, "n_test": n_test, "md5": {}}
    images, labels = [], []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        for p in (
            write_idx_images(raw / f"{prefix}-images-idx3-ubyte", x, gz=gz),
            write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", y, gz=gz),
        ):
            out["md5"][p.name] = md5(p)
        images.append(x)
        labels.append(y)
    out["images"] = np.concatenate(images)
    out["labels"] = np.concatenate(labels).astype(np.int64)
    return out


def _pickle(path: Path, obj: dict, bytes_keys: bool) -> None:
    if bytes_keys:  # as if pickled by Python 3 from bytes-keyed dicts
        obj = {k.encode(): v for k, v in obj.items()}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random NHWC images and the channel-first 3072-byte rows CIFAR stores them as."""
    nhwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    rows = nhwc.transpose(0, 3, 1, 2).reshape(n, 3072).copy()
    return nhwc, rows


def write_cifar10(root: Path, n_per_batch: int, seed: int = 0, *, bytes_keys: bool = False) -> dict:
    """Write ``root/cifar-10-batches-py`` (5 train batches, test_batch, batches.meta).

    Returns {"images" NHWC (train then test), "labels", "classes", "n_train", "n_test",
    "dir", "md5"}.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    images, labels, hashes = [], [], {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        nhwc, rows = _cifar_rows(rng, n_per_batch)
        y = rng.integers(0, 10, size=n_per_batch).tolist()  # official batches use a list
        _pickle(folder / name, {"batch_label": name, "labels": y, "data": rows}, bytes_keys)
        images.append(nhwc)
        labels += y
    _pickle(folder / "batches.meta", {"label_names": classes, "num_vis": 3072}, bytes_keys)
    for p in folder.iterdir():
        hashes[p.name] = md5(p)
    return {
        "images": np.concatenate(images), "labels": np.asarray(labels, dtype=np.int64),
        "classes": classes, "n_train": 5 * n_per_batch, "n_test": n_per_batch,
        "dir": folder, "md5": hashes,
    }  # fmt: skip


def write_cifar100(root: Path, n: int, seed: int = 0) -> dict:
    """Write ``root/cifar-100-python`` (train and test with n images each, meta).

    Returns {"images", "labels" (fine), "classes" (100 fine names), "n_train", "n_test",
    "dir", "md5"}.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    classes = [f"fine_{i:03d}" for i in range(100)]
    images, labels = [], []
    for name in ("train", "test"):
        nhwc, rows = _cifar_rows(rng, n)
        fine = rng.integers(0, 100, size=n).tolist()
        coarse = rng.integers(0, 20, size=n).tolist()
        _pickle(
            folder / name,
            {
                "filenames": [f"{i}.png" for i in range(n)],
                "fine_labels": fine,
                "coarse_labels": coarse,
                "data": rows,
            },
            False,
        )
        images.append(nhwc)
        labels += fine
    _pickle(
        folder / "meta",
        {"fine_label_names": classes, "coarse_label_names": [f"c{i}" for i in range(20)]},
        False,
    )
    return {
        "images": np.concatenate(images), "labels": np.asarray(labels, dtype=np.int64),
        "classes": classes, "n_train": n, "n_test": n, "dir": folder,
        "md5": {p.name: md5(p) for p in folder.iterdir()},
    }  # fmt: skip


def write_svhn(root: Path, n: int, seed: int = 0) -> dict:
    """Write ``root/svhn/{train,test}_32x32.mat`` with n images each (X 32x32x3xN, y 1..10).

    Returns {"images" NHWC, "labels" (10 mapped to 0), "raw_labels" (as stored), ...}.
    """
    import scipy.io

    rng = np.random.default_rng(seed)
    folder = Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    images, raw_labels = [], []
    for split in ("train", "test"):
        nhwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0] = 10  # make sure the 10 -> 0 mapping is exercised
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": nhwc.transpose(1, 2, 3, 0), "y": y})
        images.append(nhwc)
        raw_labels.append(y.ravel())
    raw = np.concatenate(raw_labels).astype(np.int64)
    return {
        "images": np.concatenate(images), "labels": np.where(raw == 10, 0, raw), "raw_labels": raw,
        "n_train": n, "n_test": n, "dir": folder,
        "md5": {p.name: md5(p) for p in folder.iterdir()},
    }  # fmt: skip


def write_image_folder(
    root: Path, classes: list[str], n_per_class: int, size: tuple[int, int] = (12, 10),
    mode: str = "RGB", seed: int = 0, ext: str = ".png",
) -> dict:  # fmt: skip
    """Write ``root/<class>/img_<i><ext>`` images of ``size`` (w, h) in PIL ``mode``.

    Returns {"files": {class: [paths]}, "arrays": {path: array as written}}.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {}
    arrays: dict[Path, np.ndarray] = {}
    w, h = size
    for c in classes:
        (Path(root) / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            shape = (h, w) if mode in ("L", "P") else (h, w, len(mode))
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = Path(root) / c / f"img_{i:03d}{ext}"
            Image.fromarray(arr).convert(mode).save(path)  # mode inferred from shape
            files.setdefault(c, []).append(path)
            arrays[path] = arr
    return {"files": files, "arrays": arrays}
