"""The canonical dataset folder: round trip, manifest, integrity checks, atomic writes, memory-mapped
reads, and files verified once until they change."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.data import residency, store, verified
from pipeline.data.store import RawDataset, read_manifest, read_raw, write_raw
from pipeline.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "bird"]


def _data(n: int = 12, seed: int = 0, shape=(5, 4, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    return images, labels


def _siblings(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_round_trip_and_manifest(tmp_path):
    images, labels = _data()
    out = tmp_path / "raw"
    manifest = write_raw(out, images, labels, CLASSES, dataset="toy", source={"origin": "test"})

    ds = read_raw(out)
    assert isinstance(ds, RawDataset) and len(ds) == 12
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    assert ds.classes == CLASSES
    assert ds.manifest == manifest == read_manifest(out)

    assert manifest["dataset"] == "toy"
    assert manifest["num_samples"] == 12
    assert manifest["image_shape"] == [5, 4, 3]
    assert manifest["num_classes"] == 3 and manifest["classes"] == CLASSES
    assert manifest["class_counts"] == {"cat": 4, "dog": 4, "bird": 4}
    assert manifest["source"] == {"origin": "test"}
    assert set(manifest["files"]) == {"images.npy", "labels.npy", "classes.json"}
    for name, meta in manifest["files"].items():
        assert meta["sha256"] == store.file_digest(out / name)
        assert meta["bytes"] == (out / name).stat().st_size
    assert manifest["files"]["images.npy"]["shape"] == [12, 5, 4, 3]
    assert manifest["files"]["images.npy"]["dtype"] == "uint8"
    assert manifest["files"]["labels.npy"]["shape"] == [12]
    assert manifest["files"]["labels.npy"]["dtype"] == "int64"
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json", "images.npy", "labels.npy", "manifest.json",
    ]  # fmt: skip
    assert _siblings(tmp_path) == ["raw"]  # no temporary folders left behind


def test_output_is_deterministic(tmp_path):
    images, labels = _data()
    write_raw(tmp_path / "a", images, labels, CLASSES, dataset="toy")
    write_raw(tmp_path / "b", images, labels, CLASSES, dataset="toy")
    for name in ("images.npy", "labels.npy", "classes.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_integer_labels_of_other_width_are_stored_as_int64(tmp_path):
    images, labels = _data()
    write_raw(tmp_path / "raw", images, labels.astype(np.uint8), CLASSES, dataset="toy")
    assert read_raw(tmp_path / "raw").labels.dtype == np.int64


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, y, c: (x.astype(np.float32), y, c), "uint8"),
        (lambda x, y, c: (x[:, :, :, 0], y, c), "N x H x W x C"),
        (lambda x, y, c: (x[:0], y[:0], c), "non-empty"),
        (lambda x, y, c: (x, y[:-1], c), "shape"),
        (lambda x, y, c: (x, y.astype(np.float64), c), "integer"),
        (lambda x, y, c: (x, y + 1, c), r"\[0, 3\)"),
        (lambda x, y, c: (x, y - 1, c), r"\[0, 3\)"),
        (lambda x, y, c: (x, y, ["a", "a", "b"]), "unique"),
        (lambda x, y, c: (x, y, []), "non-empty"),
    ],
)
def test_write_rejects_invalid_inputs(tmp_path, mutate, match):
    images, labels, classes = mutate(*_data(), CLASSES)
    with pytest.raises(DataError, match=match):
        write_raw(tmp_path / "raw", images, labels, classes, dataset="toy")
    assert not (tmp_path / "raw").exists()
    assert _siblings(tmp_path) == []


def test_source_must_be_json(tmp_path):
    with pytest.raises(DataError, match="JSON"):
        write_raw(tmp_path / "raw", *_data(), CLASSES, dataset="toy", source={"x": object()})


def test_failed_write_keeps_previous_dataset(tmp_path):
    out = tmp_path / "raw"
    images, labels = _data(seed=1)
    old = write_raw(out, images, labels, CLASSES, dataset="old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    bad_labels = labels.copy()
    bad_labels[0] = 7
    with pytest.raises(DataError):
        write_raw(out, *_data(seed=2)[:1], bad_labels, CLASSES, dataset="new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_raw(out).manifest == old
    assert _siblings(tmp_path) == ["raw"]


def test_crash_mid_write_keeps_previous_dataset(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    write_raw(out, *_data(seed=1), CLASSES, dataset="old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_save, calls = np.save, []

    def flaky_save(*args, **kwargs):  # images.npy is written, then labels.npy "crashes"
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store.np, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        write_raw(out, *_data(seed=2), CLASSES, dataset="new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(tmp_path) == ["raw"]


def test_rewrite_replaces_whole_folder(tmp_path):
    out = tmp_path / "raw"
    write_raw(out, *_data(seed=1), CLASSES, dataset="old")
    (out / "stray.txt").write_text("left over")
    images, labels = _data(n=7, seed=2, shape=(3, 3, 1))
    write_raw(out, images, labels, CLASSES, dataset="new")
    ds = read_raw(out)
    assert ds.manifest["dataset"] == "new"
    np.testing.assert_array_equal(ds.images, images)
    assert not (out / "stray.txt").exists()
    assert _siblings(tmp_path) == ["raw"]


def test_output_path_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "raw").write_text("not a folder")
    with pytest.raises(DataError, match="not a directory"):
        write_raw(tmp_path / "raw", *_data(), CLASSES, dataset="toy")


@pytest.fixture
def written(tmp_path):
    out = tmp_path / "raw"
    write_raw(out, *_data(), CLASSES, dataset="toy")
    return out


def test_edited_file_fails_sha256(written):
    path = written / "images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        read_raw(written)
    assert str(path) in str(err.value)
    assert "dvc repro fetch" in str(err.value)
    read_raw(written, verify=False)  # without verification the edit goes unnoticed


def test_truncated_npy_is_reported(written):
    path = written / "labels.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated") as err:
        read_raw(written)
    assert str(path) in str(err.value)
    # Without hashing, np.load itself fails; that is reported the same way.
    with pytest.raises(DataError, match="cannot be read as a .npy") as err:
        read_raw(written, verify=False)
    assert str(path) in str(err.value)


def test_garbage_npy_is_reported(written):
    path = written / "images.npy"
    path.write_bytes(b"definitely not numpy")
    with pytest.raises(DataError) as err:
        read_raw(written, verify=False)
    assert str(path) in str(err.value)


def test_missing_file_is_reported(written):
    (written / "labels.npy").unlink()
    with pytest.raises(DataError, match="missing") as err:
        read_raw(written)
    assert str(written / "labels.npy") in str(err.value)


def test_missing_manifest_is_reported(written):
    (written / "manifest.json").unlink()
    with pytest.raises(DataError, match="not found") as err:
        read_raw(written)
    assert str(written / "manifest.json") in str(err.value)
    with pytest.raises(DataError):
        read_manifest(written.parent / "nope")


def test_corrupt_manifest_is_reported(written):
    (written / "manifest.json").write_text("{ not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_raw(written)
    (written / "manifest.json").write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(DataError, match="malformed"):
        read_raw(written)


def test_shape_mismatch_with_manifest_is_reported(written):
    # A consistent-looking but different array: right hash in the manifest, wrong shape.
    path = written / "labels.npy"
    np.save(path, np.zeros(5, dtype=np.int64))
    manifest = json.loads((written / "manifest.json").read_text())
    manifest["files"]["labels.npy"].update(
        sha256=store.file_digest(path), bytes=path.stat().st_size
    )
    (written / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest says") as err:
        read_raw(written)
    assert str(path) in str(err.value)


def test_manifest_entries_cannot_escape_folder(written):
    manifest = json.loads((written / "manifest.json").read_text())
    manifest["files"]["../evil"] = {"sha256": "0", "bytes": 1}
    (written / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="invalid entry"):
        read_raw(written)


# ---------------------------------------------------------------------------- memory-mapped reads

def test_images_are_memory_mapped_or_read_into_memory(written):
    images, labels = _data()
    mapped = read_raw(written, in_memory=False)
    assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
    held = read_raw(written, in_memory=True)
    assert not isinstance(held.images, np.memmap)
    for ds in (mapped, held):
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, labels)
    assert not isinstance(read_raw(written, in_memory="auto").images, np.memmap)  # 720 bytes


def test_auto_holds_in_memory_only_what_is_small_beside_the_available_memory(monkeypatch):
    monkeypatch.setattr(residency, "available_memory", lambda: 8_000_000)
    assert residency.choose_in_memory("auto", 1_000_000)[0]  # an eighth of what is available
    keep, why = residency.choose_in_memory("auto", 1_000_001)
    assert not keep and "memory-mapped" in why and "data.in_memory=auto" in why
    monkeypatch.setattr(residency, "available_memory", lambda: 1 << 40)
    assert not residency.choose_in_memory("auto", residency.MAX_BYTES + 1)[0]  # the absolute limit
    assert residency.choose_in_memory(True, 1 << 50)[0] and not residency.choose_in_memory(False, 1)[0]
    with pytest.raises(ConfigError, match="data.in_memory='yes' is not one of auto, true, false"):
        residency.choose_in_memory("yes", 1)


def _hashed(monkeypatch) -> list[str]:
    """The names of the files `store` hashes from now on."""
    names: list[str] = []
    digest = store.file_digest

    def counting(path, *args, **kwargs):
        names.append(path.name)
        return digest(path, *args, **kwargs)

    monkeypatch.setattr(store, "file_digest", counting)
    return names


def test_a_verified_file_is_not_hashed_again_until_it_changes(written, monkeypatch):
    monkeypatch.setattr(verified, "RACY_S", 0.0)  # else files written this second are always re-hashed
    for path in written.iterdir():  # written long ago: the edit below cannot fall in the same tick
        os.utime(path, (1e9, 1e9))
    hashed = _hashed(monkeypatch)
    read_raw(written, in_memory=False)
    assert sorted(hashed) == ["classes.json", "images.npy", "labels.npy"]
    assert verified.record_path(written).is_file()
    assert sorted(p.name for p in written.iterdir()) == ["classes.json", "images.npy", "labels.npy", "manifest.json"]
    hashed.clear()
    read_raw(written, in_memory=False)
    assert hashed == []
    # Edited in place, same size: its times change, so it is hashed again, and fails.
    path = written / "images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(bytes(data))
    with pytest.raises(DataError, match="sha256 mismatch"):
        read_raw(written)
    assert hashed == ["images.npy"]


def test_a_file_changed_just_before_its_check_is_hashed_every_time(written, monkeypatch):
    hashed = _hashed(monkeypatch)
    read_raw(written)
    read_raw(written)
    assert hashed.count("images.npy") == 2  # a change within the same timestamp tick could hide
    assert not verified.record_path(written).exists()
