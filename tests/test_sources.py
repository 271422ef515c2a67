"""Every source → (images NHWC uint8, labels int64, classes, info), from tiny real-format files."""

from __future__ import annotations

import gzip
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torchvision.datasets as tvd

from fixtures_formats import (
    FASHION_CLASSES,
    md5,
    write_cifar10,
    write_cifar100,
    write_idx_images,
    write_image_folder,
    write_mnist_like,
    write_svhn,
)
from pipeline.data import fetch, list_sources, load_source, read_raw
from pipeline.data.formats import IDX_IMAGES_MAGIC, read_idx
from pipeline.errors import ConfigError, DataError

DEAD_URL = "http://127.0.0.1:9/"  # the discard port: connection refused, never the network


def _check_types(images, labels, classes):
    assert images.dtype == np.uint8 and images.ndim == 4
    assert labels.dtype == np.int64 and labels.shape == (images.shape[0],)
    assert images.flags["C_CONTIGUOUS"]
    assert 0 <= labels.min() and labels.max() < len(classes)


def test_list_sources():
    assert list_sources() == [
        "cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "mnist", "svhn",
    ]  # fmt: skip


def test_unknown_source_lists_valid_names(tmp_path):
    with pytest.raises(DataError, match="unknown dataset source 'nope'.*cifar10.*svhn"):
        load_source("nope", download_dir=tmp_path)


def test_digits_offline(tmp_path):
    images, labels, classes, info = load_source("digits", download_dir=tmp_path, download=False)
    assert images.shape == (1797, 8, 8, 1)
    _check_types(images, labels, classes)
    assert classes == [str(i) for i in range(10)]
    assert images.max() == 255 and images.min() == 0
    from sklearn.datasets import load_digits

    bunch = load_digits()
    np.testing.assert_array_equal(images[..., 0], np.round(bunch.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, bunch.target)
    assert info["name"] == "digits"


def test_digits_without_the_shipped_table_come_from_load_digits(tmp_path, monkeypatch):
    """The fetch reads scikit-learn's digits table directly (no `sklearn.datasets` import);
    a scikit-learn that keeps it elsewhere falls back to `load_digits`, with the same arrays."""
    from pipeline.data import sources

    direct = load_source("digits", download_dir=tmp_path, download=False)
    assert sources._sklearn_digits_file() is not None  # this scikit-learn's layout: the direct read ran
    monkeypatch.setattr(sources, "_sklearn_digits_file", lambda: None)
    fallback = load_source("digits", download_dir=tmp_path, download=False)
    for got, expected in zip(fallback[:2], direct[:2]):
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype
    assert fallback[2:] == direct[2:]


# --------------------------------------------------------------------------- MNIST-style


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "name, folder, classes",
    [
        ("mnist", "MNIST", [str(i) for i in range(10)]),
        ("fashion_mnist", "FashionMNIST", FASHION_CLASSES),
    ],
)
def test_idx_round_trip(tmp_path, name, folder, classes, gz):
    wrote = write_mnist_like(tmp_path, folder, n_train=7, n_test=3, seed=1, gz=gz)
    images, labels, got_classes, info = load_source(
        name, download_dir=tmp_path, download=False, checksums=wrote["md5"]
    )
    _check_types(images, labels, got_classes)
    assert images.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(images[..., 0], wrote["images"])
    np.testing.assert_array_equal(labels, wrote["labels"])
    assert got_classes == classes
    assert info["official_train"] == 7 and info["official_test"] == 3
    assert info["files_md5"] == wrote["md5"]
    assert "unverified_files" not in info


def test_unzipped_idx_without_known_checksum_is_recorded(tmp_path):
    write_mnist_like(tmp_path, "MNIST", 2, 2, gz=False)
    *_, info = load_source("mnist", download_dir=tmp_path, download=False)
    assert sorted(info["unverified_files"]) == sorted(
        [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ]
    )


def test_default_md5_table_rejects_foreign_files(tmp_path):
    wrote = write_mnist_like(tmp_path, "MNIST", 2, 2)
    with pytest.raises(DataError, match="md5 mismatch") as err:
        load_source("mnist", download_dir=tmp_path, download=False)
    assert str(wrote["dir"] / "train-images-idx3-ubyte.gz") in str(err.value)


def test_checksum_override_mismatch_names_file(tmp_path):
    wrote = write_mnist_like(tmp_path, "FashionMNIST", 2, 2)
    bad = {**wrote["md5"], "t10k-labels-idx1-ubyte.gz": "0" * 32}
    with pytest.raises(DataError, match="md5 mismatch") as err:
        load_source("fashion_mnist", download_dir=tmp_path, download=False, checksums=bad)
    assert str(wrote["dir"] / "t10k-labels-idx1-ubyte.gz") in str(err.value)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_names_file(tmp_path, gz):
    wrote = write_mnist_like(tmp_path, "MNIST", 4, 2, gz=gz)
    path = wrote["dir"] / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-50])
    sums = {**wrote["md5"], path.name: md5(path)}  # checksum passes: the parser must catch it
    with pytest.raises(DataError) as err:
        load_source("mnist", download_dir=tmp_path, download=False, checksums=sums)
    assert str(path) in str(err.value)


def test_read_idx_checks_magic_and_length(tmp_path):
    path = write_idx_images(tmp_path / "x-idx3-ubyte", np.zeros((2, 3, 4), dtype=np.uint8))
    assert read_idx(path, magic=IDX_IMAGES_MAGIC).shape == (2, 3, 4)
    with pytest.raises(DataError, match="magic number 2049"):
        read_idx(path, magic=2049)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path, magic=IDX_IMAGES_MAGIC)
    gz = tmp_path / "bad.gz"
    gz.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(DataError, match="cannot be read"):
        read_idx(gz, magic=IDX_IMAGES_MAGIC)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match="download is disabled") as err:
        load_source("mnist", download_dir=tmp_path, download=False)
    msg = str(err.value)
    raw = (tmp_path / "MNIST" / "raw").absolute()
    assert str(raw) in msg
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert str(raw / f"{name}.gz") in msg


def test_download_failure_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(tvd.MNIST, "mirrors", [DEAD_URL])
    with pytest.raises(DataError, match="mnist: download failed") as err:
        load_source("mnist", download_dir=tmp_path)
    msg = str(err.value)
    raw = (tmp_path / "MNIST" / "raw").absolute()
    assert (
        str(raw / "train-images-idx3-ubyte.gz") in msg
        and str(raw / "t10k-labels-idx1-ubyte.gz") in msg
    )
    assert "127.0.0.1:9" in msg
    assert not any(raw.iterdir())  # no partial downloads left behind


@pytest.fixture
def local_http(tmp_path):
    """Serve tmp_path/"mirror" over HTTP on 127.0.0.1 (a stand-in for the real mirrors)."""
    root = tmp_path / "mirror"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_only_missing_files(tmp_path, monkeypatch, local_http):
    mirror, url = local_http
    wrote = write_mnist_like(mirror, "MNIST", 3, 2, seed=5)
    monkeypatch.setattr(tvd.MNIST, "mirrors", [DEAD_URL, url + "MNIST/raw/"])  # first mirror fails
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    keep = raw / "train-images-idx3-ubyte.gz"
    keep.write_bytes((wrote["dir"] / keep.name).read_bytes())
    before = keep.stat().st_mtime_ns

    images, labels, _, _ = load_source("mnist", download_dir=root, checksums=wrote["md5"])
    np.testing.assert_array_equal(images[..., 0], wrote["images"])
    np.testing.assert_array_equal(labels, wrote["labels"])
    assert keep.stat().st_mtime_ns == before
    assert (raw / "t10k-labels-idx1-ubyte").is_file()  # extracted next to the .gz, like torchvision


def test_present_files_are_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(tvd.MNIST, "mirrors", [DEAD_URL])
    wrote = write_mnist_like(tmp_path, "MNIST", 2, 2)
    images, *_ = load_source("mnist", download_dir=tmp_path, checksums=wrote["md5"])
    assert len(images) == 4


# --------------------------------------------------------------------------- CIFAR / SVHN


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_round_trip(tmp_path, bytes_keys):
    wrote = write_cifar10(tmp_path, n_per_batch=3, seed=2, bytes_keys=bytes_keys)
    images, labels, classes, info = load_source(
        "cifar10", download_dir=tmp_path, download=False, checksums=wrote["md5"]
    )
    _check_types(images, labels, classes)
    assert images.shape == (18, 32, 32, 3)
    np.testing.assert_array_equal(images, wrote["images"])
    np.testing.assert_array_equal(labels, wrote["labels"])
    assert classes == wrote["classes"]
    assert (info["official_train"], info["official_test"]) == (15, 3)


def test_cifar10_layout_is_channel_first_rows(tmp_path):
    """The first 1024 bytes of a row are the red plane: check one pixel by hand."""
    wrote = write_cifar10(tmp_path, n_per_batch=1)
    images, *_ = load_source(
        "cifar10", download_dir=tmp_path, download=False, checksums=wrote["md5"]
    )
    import pickle

    row = pickle.loads((wrote["dir"] / "data_batch_1").read_bytes())["data"][0]
    r, c = 5, 7
    assert tuple(images[0, r, c]) == (
        row[r * 32 + c],
        row[1024 + r * 32 + c],
        row[2048 + r * 32 + c],
    )


def test_cifar100_round_trip_uses_fine_labels(tmp_path):
    wrote = write_cifar100(tmp_path, n=4, seed=3)
    images, labels, classes, info = load_source(
        "cifar100", download_dir=tmp_path, download=False, checksums=wrote["md5"]
    )
    _check_types(images, labels, classes)
    np.testing.assert_array_equal(images, wrote["images"])
    np.testing.assert_array_equal(labels, wrote["labels"])
    assert classes == wrote["classes"] and len(classes) == 100
    assert (info["official_train"], info["official_test"]) == (4, 4)


def test_cifar_wrong_md5_and_missing(tmp_path, monkeypatch):
    wrote = write_cifar10(tmp_path, n_per_batch=1)
    with pytest.raises(DataError, match="md5 mismatch") as err:  # torchvision's real md5 table
        load_source("cifar10", download_dir=tmp_path, download=False)
    assert str(wrote["dir"]) in str(err.value)
    (wrote["dir"] / "test_batch").unlink()
    monkeypatch.setattr(tvd.CIFAR10, "url", DEAD_URL + "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="cifar10: download failed") as err:
        load_source("cifar10", download_dir=tmp_path, checksums=wrote["md5"])
    assert str(wrote["dir"].absolute() / "test_batch") in str(err.value)
    assert "cifar-10-python.tar.gz" in str(err.value)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_svhn_round_trip_maps_10_to_0(tmp_path):
    wrote = write_svhn(tmp_path, n=5, seed=4)
    images, labels, classes, info = load_source(
        "svhn", download_dir=tmp_path, download=False, checksums=wrote["md5"]
    )
    _check_types(images, labels, classes)
    assert images.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(images, wrote["images"])
    np.testing.assert_array_equal(labels, wrote["labels"])
    assert (wrote["raw_labels"] == 10).any() and labels[wrote["raw_labels"] == 10].max() == 0
    assert classes == [str(i) for i in range(10)]
    assert (info["official_train"], info["official_test"]) == (5, 5)


def test_svhn_download_failure(tmp_path, monkeypatch):
    split_list = {k: [DEAD_URL + v[1], v[1], v[2]] for k, v in tvd.SVHN.split_list.items()}
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    with pytest.raises(DataError, match="svhn: download failed") as err:
        load_source("svhn", download_dir=tmp_path)
    folder = (tmp_path / "svhn").absolute()
    assert str(folder / "train_32x32.mat") in str(err.value)
    assert str(folder / "test_32x32.mat") in str(err.value)


def test_corrupt_svhn_names_file(tmp_path):
    wrote = write_svhn(tmp_path, n=2)
    path = wrote["dir"] / "test_32x32.mat"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        load_source(
            "svhn",
            download_dir=tmp_path,
            download=False,
            checksums={**wrote["md5"], path.name: md5(path)},
        )
    assert str(path) in str(err.value)


def test_fetch_writes_canonical_folder(tmp_path):
    wrote = write_cifar10(tmp_path / "dl", n_per_batch=2)
    manifest = fetch(
        "cifar10",
        out_dir=tmp_path / "raw",
        download_dir=tmp_path / "dl",
        download=False,
        checksums=wrote["md5"],
    )
    ds = read_raw(tmp_path / "raw")
    np.testing.assert_array_equal(ds.images, wrote["images"])
    assert ds.manifest == manifest
    assert manifest["dataset"] == "cifar10"
    assert manifest["source"]["official_train"] == 10 and manifest["source"]["official_test"] == 2


# --------------------------------------------------------------------------- image folders


def test_imagefolder_resizes_converts_and_sorts(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, ["zebra", "apple", "mango"], n_per_class=3, size=(12, 10), mode="RGB")
    write_image_folder(root, ["mango"], n_per_class=1, size=(5, 5), mode="L", ext=".JPG")
    (root / "apple" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    images, labels, classes, info = load_source(
        "imagefolder", download_dir=tmp_path, path=root, image_size=6
    )
    _check_types(images, labels, classes)
    assert classes == ["apple", "mango", "zebra"]
    assert images.shape == (10, 6, 6, 3)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    assert info["num_files"] == 10 and info["image_size"] == 6 and info["channels"] == 3

    gray, *_ = load_source(
        "imagefolder", download_dir=tmp_path, path=root, image_size=4, channels=1
    )
    assert gray.shape == (10, 4, 4, 1)


def test_imagefolder_keeps_pixels_at_native_size(tmp_path):
    root = tmp_path / "imgs"
    wrote = write_image_folder(root, ["a", "b"], n_per_class=2, size=(8, 8), mode="L")
    images, labels, *_ = load_source(
        "imagefolder", download_dir=tmp_path, path=root, image_size=8, channels=1
    )
    expected = [wrote["arrays"][p] for c in ("a", "b") for p in wrote["files"][c]]
    np.testing.assert_array_equal(images[..., 0], np.stack(expected))


def test_imagefolder_handles_palette_and_rgba(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, ["p"], n_per_class=2, size=(7, 7), mode="P", ext=".gif")
    write_image_folder(root, ["rgba"], n_per_class=2, size=(7, 7), mode="RGBA", ext=".webp")
    images, labels, classes, _ = load_source(
        "imagefolder", download_dir=tmp_path, path=root, image_size=7
    )
    assert images.shape == (4, 7, 7, 3) and classes == ["p", "rgba"]


def test_imagefolder_corrupt_image_names_file(tmp_path):
    root = tmp_path / "imgs"
    wrote = write_image_folder(root, ["a", "b"], n_per_class=2, size=(8, 8))
    bad = wrote["files"]["b"][1]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError, match="cannot be decoded") as err:
        load_source("imagefolder", download_dir=tmp_path, path=root, image_size=8)
    assert str(bad) in str(err.value)


def test_imagefolder_errors(tmp_path):
    root = tmp_path / "imgs"
    with pytest.raises(DataError, match="does not exist") as err:
        load_source("imagefolder", download_dir=tmp_path, path=root, image_size=8)
    assert str(root) in str(err.value)
    root.mkdir()
    (root / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_source("imagefolder", download_dir=tmp_path, path=root, image_size=8)
    write_image_folder(root, ["a"], n_per_class=1)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="has no images") as err:
        load_source("imagefolder", download_dir=tmp_path, path=root, image_size=8)
    assert str(root / "empty") in str(err.value)
    with pytest.raises(ConfigError, match="image_size"):
        load_source("imagefolder", download_dir=tmp_path, path=root)
    with pytest.raises(ConfigError, match="channels"):
        load_source("imagefolder", download_dir=tmp_path, path=root, image_size=8, channels=2)
    with pytest.raises(ConfigError, match="path"):
        load_source("imagefolder", download_dir=tmp_path, image_size=8)
