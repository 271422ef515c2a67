"""Dataset sources: turn every supported dataset into arrays for the canonical store.

Torchvision-format datasets are read from the same folder layout torchvision uses, so a
``download_dir`` shared with torchvision works. URLs and md5 sums are read from
torchvision's dataset classes at runtime (no copied tables to drift out of date). Files
are downloaded only when missing and every file is md5-checked before it is parsed, so a
CIFAR pickle is only unpickled once its checksum is known to be right (see downloads.py).

Sources are looked up in a registry (``_LOADERS``) instead of if/elif chains on names, so
adding a dataset is one loader function plus one ``_register`` line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import downloads, formats
from pipeline.data.downloads import RawFiles, download_file, obtain
from pipeline.data.imagefolder import fetch_image_folder
from pipeline.data.store import write_raw
from pipeline.errors import ConfigError, DataError

Loaded = tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)  # fmt: skip


@dataclass(frozen=True)
class _Request:
    download_dir: Path
    download: bool
    path: Path | None
    image_size: int | None
    channels: int | None
    checksums: Mapping[str, str]


_LOADERS: dict[str, Callable[[_Request], Loaded]] = {}
# Sources that `fetch` streams to disk instead of loading whole (request, out_dir, workers).
_STREAMED: dict[str, Callable[[_Request, Path, int | None], dict]] = {}


def _register(
    name: str, loader: Callable[[_Request], Loaded],
    streamed: Callable[[_Request, Path, int | None], dict] | None = None,
) -> None:  # fmt: skip
    _LOADERS[name] = loader
    if streamed is not None:
        _STREAMED[name] = streamed


def _tv():
    import torchvision.datasets  # lazy: importing torchvision takes about a second

    return torchvision.datasets


def _split_info(n_train: int, n_test: int, **extra: Any) -> dict[str, Any]:
    return {"official_train": int(n_train), "official_test": int(n_test), **extra}


# --------------------------------------------------------------------------- loaders


def _sklearn_digits_file() -> Path | None:
    """The digits table scikit-learn ships (`datasets/data/digits.csv.gz`, what its
    `load_digits` reads), found without importing `sklearn.datasets`: that import alone takes
    1.4 s here, most of the fetch stage. None when this scikit-learn keeps it elsewhere."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _load_digits(req: _Request) -> Loaded:
    path = _sklearn_digits_file()  # bundled with scikit-learn: works offline
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.images, bunch.target
    else:  # as load_digits parses it: a row is 64 pixels (0-16), then the label
        table = np.loadtxt(path, delimiter=",")
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    images = np.round(np.clip(pixels, 0, 16) * 255 / 16).astype(np.uint8)[..., None]
    info = {"origin": "sklearn.datasets.load_digits", "pixel_scaling": "round(x * 255 / 16)"}
    return images, target.astype(np.int64), list(DIGIT_CLASSES), info


def _download_idx(tv_cls: Any, folder: Path, missing: list[str], md5: Mapping[str, str]) -> None:
    for name in missing:
        errors = []
        for mirror in tv_cls.mirrors:  # torchvision's order: first mirror that works wins
            try:
                download_file(f"{mirror}{name}", folder, name, md5.get(name), extract=True)
                break
            except downloads.DOWNLOAD_ERRORS as e:
                errors.append(f"{mirror}{name}: {e}")
        else:
            raise OSError("; ".join(errors))


def _load_idx_dataset(req: _Request, *, dataset: str, tv_name: str, classes: list[str]) -> Loaded:
    tv_cls = getattr(_tv(), tv_name)
    folder = req.download_dir / tv_name / "raw"  # torchvision: <root>/<ClassName>/raw
    spec = RawFiles(
        dataset=dataset,
        folder=folder,
        # The .gz is preferred because torchvision's md5 sums are for the .gz files.
        required=tuple((f"{name}.gz", name) for name in IDX_FILES),
        md5=dict(tv_cls.resources),
        urls=tuple(tv_cls.mirrors),
        download=partial(_download_idx, tv_cls, folder),
    )
    found, info = obtain(spec, download=req.download, checksums=req.checksums)
    splits = []
    for prefix in ("train", "t10k"):
        images_path = found[f"{prefix}-images-idx3-ubyte.gz"]
        labels_path = found[f"{prefix}-labels-idx1-ubyte.gz"]
        images = formats.read_idx(images_path, magic=formats.IDX_IMAGES_MAGIC)
        labels = formats.read_idx(labels_path, magic=formats.IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{images_path} has {images.shape[0]} images but {labels_path} has "
                f"{labels.shape[0]} labels; delete both so they are downloaded again"
            )
        splits.append((images, labels))
    (xtr, ytr), (xte, yte) = splits
    images = np.concatenate([xtr, xte])[..., None]
    labels = np.concatenate([ytr, yte]).astype(np.int64)
    return images, labels, list(classes), _split_info(len(ytr), len(yte), format="idx", **info)


def _load_cifar(req: _Request, *, dataset: str, tv_name: str, label_key: str) -> Loaded:
    cls = getattr(_tv(), tv_name)
    train = [name for name, _ in cls.train_list]
    test = [name for name, _ in cls.test_list]
    meta = cls.meta["filename"]
    spec = RawFiles(
        dataset=dataset,
        folder=req.download_dir / cls.base_folder,
        required=tuple((name,) for name in [*train, *test, meta]),
        md5={**dict(cls.train_list), **dict(cls.test_list), meta: cls.meta["md5"]},
        urls=(cls.url,),
        # One archive holds every file, so whatever is missing the whole archive is fetched.
        download=lambda _missing, md5: download_file(
            cls.url,
            req.download_dir,
            cls.filename,
            md5.get(cls.filename, cls.tgz_md5),
            extract=True,
        ),
        hint=f"(extract {cls.filename} into {req.download_dir.absolute()} to create them)",
    )
    found, info = obtain(spec, download=req.download, checksums=req.checksums)
    parts = [formats.read_cifar_batch(found[name], label_key=label_key) for name in [*train, *test]]
    classes = formats.read_cifar_classes(found[meta], key=cls.meta["key"])
    n_train = sum(len(labels) for _, labels in parts[: len(train)])
    images = np.concatenate([x for x, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    extra = {"label_key": label_key} if label_key != "labels" else {}
    return (
        images,
        labels,
        classes,
        _split_info(n_train, len(labels) - n_train, format="cifar-python", **extra, **info),
    )


def _download_svhn(
    folder: Path, split_list: Mapping[str, list[str]], missing: list[str], md5: Mapping[str, str]
) -> None:
    for url, filename, _ in split_list.values():
        if filename in missing:
            download_file(url, folder, filename, md5.get(filename), extract=False)


def _load_svhn(req: _Request) -> Loaded:
    split_list = {s: _tv().SVHN.split_list[s] for s in ("train", "test")}  # "extra" is not used
    folder = req.download_dir / "svhn"
    spec = RawFiles(
        dataset="svhn",
        folder=folder,
        required=tuple((filename,) for _, filename, _ in split_list.values()),
        md5={filename: md5 for _, filename, md5 in split_list.values()},
        urls=tuple(url for url, _, _ in split_list.values()),
        download=partial(_download_svhn, folder, split_list),
    )
    found, info = obtain(spec, download=req.download, checksums=req.checksums)
    xtr, ytr = formats.read_svhn_mat(found[split_list["train"][1]])
    xte, yte = formats.read_svhn_mat(found[split_list["test"][1]])
    images, labels = np.concatenate([xtr, xte]), np.concatenate([ytr, yte])
    return (
        images,
        labels,
        list(DIGIT_CLASSES),
        _split_info(len(ytr), len(yte), format="svhn-mat", **info),
    )


def _imagefolder_args(req: _Request) -> tuple[Path, int, int]:
    if req.path is None:
        raise ConfigError(
            "imagefolder needs `path`: a directory with one sub-folder of images per class"
        )
    size, channels = req.image_size, 3 if req.channels is None else req.channels
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"imagefolder needs `image_size`, a positive integer (got {size!r})")
    if channels not in (1, 3):
        raise ConfigError(
            f"imagefolder `channels` must be 1 (grayscale) or 3 (RGB), got {channels!r}"
        )
    return req.path, size, channels


def _load_imagefolder(req: _Request) -> Loaded:
    path, size, channels = _imagefolder_args(req)
    images, labels, classes, files = formats.read_image_folder(
        path, image_size=size, channels=channels
    )
    info = {
        "path": str(path),
        "image_size": size,
        "channels": channels,
        "num_files": len(files),
    }
    return images, labels, classes, info


def _stream_imagefolder(req: _Request, out_dir: Path, workers: int | None) -> dict:
    path, size, channels = _imagefolder_args(req)
    # The same source info as _load_imagefolder's; the fetch adds num_files once it has listed.
    source = {"name": "imagefolder", "path": str(path), "image_size": size, "channels": channels}
    return fetch_image_folder(path, out_dir, image_size=size, channels=channels,
                              dataset="imagefolder", source=source, workers=workers)


_register("digits", _load_digits)
_register(
    "mnist", partial(_load_idx_dataset, dataset="mnist", tv_name="MNIST", classes=DIGIT_CLASSES)
)
_register(
    "fashion_mnist",
    partial(
        _load_idx_dataset,
        dataset="fashion_mnist",
        tv_name="FashionMNIST",
        classes=FASHION_MNIST_CLASSES,
    ),
)
_register("cifar10", partial(_load_cifar, dataset="cifar10", tv_name="CIFAR10", label_key="labels"))
_register(
    "cifar100",
    partial(_load_cifar, dataset="cifar100", tv_name="CIFAR100", label_key="fine_labels"),
)
_register("svhn", _load_svhn)
_register("imagefolder", _load_imagefolder, streamed=_stream_imagefolder)


# --------------------------------------------------------------------------- public API


def list_sources() -> list[str]:
    """Names accepted by ``load_source`` / ``fetch``, sorted."""
    return sorted(_LOADERS)


def _request(
    name: str, download_dir: Path, download: bool, path: Path | None, image_size: int | None,
    channels: int | None, checksums: Mapping[str, str] | None,
) -> _Request:  # fmt: skip
    if name not in _LOADERS:
        raise DataError(
            f"unknown dataset source {name!r}; valid names: {', '.join(list_sources())}"
        )
    return _Request(
        download_dir=Path(download_dir),
        download=download,
        path=None if path is None else Path(path),
        image_size=image_size,
        channels=channels,
        checksums=dict(checksums or {}),
    )


def load_source(
    name: str,
    *,
    download_dir: Path,
    download: bool = True,
    path: Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    checksums: Mapping[str, str] | None = None,
) -> Loaded:
    """Load dataset ``name`` as (images uint8 NHWC, labels int64, classes, source info).

    ``path``, ``image_size`` and ``channels`` are used by ``imagefolder`` only; the other
    sources have a fixed native size. ``checksums`` (filename -> md5) overrides
    torchvision's published md5 sums for the raw files.
    """
    req = _request(name, download_dir, download, path, image_size, channels, checksums)
    images, labels, classes, info = _LOADERS[name](req)
    # Loaders already return C-ordered arrays; this is a no-op guard for future ones.
    return np.ascontiguousarray(images), labels, classes, {"name": name, **info}


def fetch(
    name: str,
    *,
    out_dir: Path,
    download_dir: Path,
    download: bool = True,
    path: Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    checksums: Mapping[str, str] | None = None,
    workers: int | None = None,
) -> dict:
    """Write dataset ``name`` atomically to ``out_dir``; return the manifest.

    Image folders are streamed: decoded by ``workers`` threads (default: one per CPU) straight
    into the file on disk, with memory that does not grow with the number of images, resuming
    an interrupted fetch (``imagefolder.py``). The other sources are loaded whole, then written.
    """
    streamed = _STREAMED.get(name)
    if streamed is not None:
        req = _request(name, download_dir, download, path, image_size, channels, checksums)
        return streamed(req, Path(out_dir), workers)
    images, labels, classes, info = load_source(
        name,
        download_dir=download_dir,
        download=download,
        path=path,
        image_size=image_size,
        channels=channels,
        checksums=checksums,
    )
    return write_raw(out_dir, images, labels, classes, dataset=name, source=info)
