"""The streamed image-folder fetch (pipeline/data/imagefolder.py): the same folder as the
in-memory path byte for byte, progress in lines, nothing left by a bad image, and a fetch
stopped part-way (in this process, then real signals to the real fetch stage) resumed where it
stopped."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from fixtures_formats import write_image_folder
from pipeline.config import compose
from pipeline.data import fetch, formats, imagefolder, load_source
from pipeline.data.store import write_raw
from pipeline.errors import DataError
from procs import project_env

REPO = Path(__file__).resolve().parents[1]
FILES = ("images.npy", "labels.npy", "classes.json", "manifest.json")
DECODE = formats.decode_image  # the real one, before any test wraps it


def _folder(root: Path) -> Path:
    """Three classes of RGB PNGs, grey JPEGs of another size in one, a nested sub-folder, a
    note and a hidden folder (both skipped): 3 * 9 + 2 + 1 = 30 images."""
    write_image_folder(root, ["zebra", "apple", "mango"], n_per_class=9, size=(12, 10), mode="RGB")
    write_image_folder(root, ["mango"], n_per_class=2, size=(5, 5), mode="L", ext=".JPG", seed=1)
    write_image_folder(root / "apple", ["nested"], n_per_class=1, size=(9, 9), seed=2)
    (root / "apple" / "notes.txt").write_text("skipped")
    (root / ".hidden").mkdir()
    return root


def _in_memory(root: Path, out: Path, tmp: Path, **kw) -> None:
    """The fetch as it was before streaming: decode the whole folder, then `write_raw`."""
    images, labels, classes, info = load_source("imagefolder", download_dir=tmp, path=root, **kw)
    write_raw(out, images, labels, classes, dataset="imagefolder", source=info)


def _same_folder(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in b.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 images, progress saved after each: a 30-image folder takes 8 chunks."""
    monkeypatch.setattr(imagefolder, "MAX_CHUNK_ROWS", 4)
    monkeypatch.setattr(imagefolder, "SAVE_S", 0.0)


@pytest.mark.parametrize("channels, workers", [(3, 1), (1, 3)])
def test_streamed_fetch_is_the_in_memory_fetch_byte_for_byte(tmp_path, small_chunks, channels, workers):
    root = _folder(tmp_path / "imgs")
    manifest = fetch("imagefolder", out_dir=tmp_path / "raw" / "streamed", download_dir=tmp_path, path=root,
                     image_size=6, channels=channels, workers=workers)
    _in_memory(root, tmp_path / "raw" / "in_memory", tmp_path, image_size=6, channels=channels)
    _same_folder(tmp_path / "raw" / "streamed", tmp_path / "raw" / "in_memory")
    assert manifest["num_samples"] == 30 and manifest["source"]["num_files"] == 30
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["in_memory", "streamed"]  # no partial left


def test_progress_comes_in_lines_per_chunk_not_per_image(tmp_path, small_chunks, caplog):
    root = _folder(tmp_path / "imgs")
    with caplog.at_level(logging.INFO, logger="pipeline.data.imagefolder"):
        imagefolder.fetch_image_folder(root, tmp_path / "raw", image_size=6, channels=3, dataset="imagefolder",
                                       source={}, workers=2, progress_s=0.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.data.imagefolder"]
    progress = [line for line in lines if line.startswith("fetch: ")]
    assert len(progress) == 8, lines  # one per chunk of 4 (30 images), not one per image
    assert progress[-1].startswith("fetch: 30 of 30 images (100%)")
    assert lines[0].startswith("fetching 30 images in 3 classes") and lines[-1].startswith("fetched 30 images")


def test_a_bad_image_leaves_nothing_behind(tmp_path, small_chunks):
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "raw" / "imagefolder"
    fetch("imagefolder", out_dir=out, download_dir=tmp_path, path=root, image_size=6)
    before = {name: (out / name).read_bytes() for name in FILES}
    bad = root / "zebra" / "img_007.png"  # the 29th image: 7 chunks are written before it
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match="cannot be decoded") as err:
        fetch("imagefolder", out_dir=out, download_dir=tmp_path, path=root, image_size=6)
    assert str(bad) in str(err.value) and "delete or replace the file" in str(err.value)
    assert {name: (out / name).read_bytes() for name in FILES} == before  # the previous fetch, whole
    assert [p.name for p in out.parent.iterdir()] == ["imagefolder"]  # no partial state, no listing

    # Where the output's folders did not exist, they are not left behind either.
    with pytest.raises(DataError, match="cannot be decoded"):
        fetch("imagefolder", out_dir=tmp_path / "new" / "raw" / "x", download_dir=tmp_path, path=root, image_size=6)
    assert not (tmp_path / "new").exists()


def test_listing_errors_come_before_anything_is_written(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="has no images") as err:
        fetch("imagefolder", out_dir=tmp_path / "data" / "raw" / "x", download_dir=tmp_path, path=root, image_size=6)
    assert str(root / "empty") in str(err.value) and "add images or remove the folder" in str(err.value)
    assert not (tmp_path / "data").exists()


class _StopAfter:
    """`formats.decode_image` that raises KeyboardInterrupt (as Ctrl+C would) once `limit`
    images are decoded, and counts the images it decoded."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit, self.calls = limit, 0

    def __call__(self, *args):
        if self.limit is not None and self.calls >= self.limit:
            raise KeyboardInterrupt
        self.calls += 1
        return DECODE(*args)


def _done(out: Path) -> int:
    return json.loads((imagefolder.partial_folder(out) / imagefolder.DONE).read_text())["images"]


def _stopped_fetch(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A 30-image folder whose fetch was interrupted after 13 decoded images: (folder, out)."""
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "raw" / "imagefolder"
    monkeypatch.setattr(formats, "decode_image", _StopAfter(limit=13))
    with pytest.raises(KeyboardInterrupt):
        fetch("imagefolder", out_dir=out, download_dir=tmp_path, path=root, image_size=6, workers=1)
    return root, out


def test_a_stopped_fetch_resumes_where_it_stopped(tmp_path, small_chunks, monkeypatch, caplog):
    root, out = _stopped_fetch(tmp_path, monkeypatch)
    assert not out.exists()
    done = _done(out)
    assert 0 < done <= 13 and done % 4 == 0  # whole chunks only: 12

    rerun = _StopAfter()
    monkeypatch.setattr(formats, "decode_image", rerun)
    with caplog.at_level(logging.INFO, logger="pipeline.data.imagefolder"):
        fetch("imagefolder", out_dir=out, download_dir=tmp_path, path=root, image_size=6, workers=2)
    assert f"at image {done} of 30" in caplog.text
    assert rerun.calls == 30 - done  # continued, not restarted
    assert not imagefolder.partial_folder(out).exists()
    monkeypatch.setattr(formats, "decode_image", DECODE)
    _in_memory(root, tmp_path / "in_memory", tmp_path, image_size=6)
    _same_folder(out, tmp_path / "in_memory")


def test_a_changed_folder_or_size_starts_over(tmp_path, small_chunks, monkeypatch, caplog):
    root, out = _stopped_fetch(tmp_path, monkeypatch)
    assert _done(out) > 0
    monkeypatch.setattr(formats, "decode_image", _StopAfter(limit=13))
    with caplog.at_level(logging.INFO, logger="pipeline.data.imagefolder"), pytest.raises(KeyboardInterrupt):
        fetch("imagefolder", out_dir=out, download_dir=tmp_path, path=root, image_size=5, workers=1)
    assert "starting over" in caplog.text and _done(out) > 0  # another image size: not resumed
    caplog.clear()
    # An image already decoded is replaced: resuming would keep its old pixels.
    changed = root / "apple" / "img_000.png"
    Image.fromarray(np.full((10, 12, 3), 7, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))

    rerun = _StopAfter()
    monkeypatch.setattr(formats, "decode_image", rerun)
    with caplog.at_level(logging.INFO, logger="pipeline.data.imagefolder"):
        fetch("imagefolder", out_dir=out, download_dir=tmp_path, path=root, image_size=5, workers=2)
    assert "starting over" in caplog.text and rerun.calls == 30
    monkeypatch.setattr(formats, "decode_image", DECODE)
    _in_memory(root, tmp_path / "in_memory", tmp_path, image_size=5)
    _same_folder(out, tmp_path / "in_memory")


def test_a_fetch_waits_while_another_fetches_into_the_same_folder(tmp_path, small_chunks, caplog):
    """Two fetches would share one partial state: the second waits for the first's lock (held
    here as another fetch would hold it), touches nothing meanwhile, then fetches."""
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "raw" / "imagefolder"
    out.parent.mkdir()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fetch("imagefolder", out_dir=out, download_dir=tmp_path, path=root, image_size=6, workers=1)
        except BaseException as err:
            errors.append(err)

    lock = os.open(out.parent, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    with caplog.at_level(logging.INFO, logger="pipeline.data.imagefolder"):
        waiting = threading.Thread(target=run)
        waiting.start()
        deadline = time.monotonic() + 60
        while "waiting for another image-folder fetch" not in caplog.text:
            assert waiting.is_alive() and time.monotonic() < deadline, (errors, caplog.text)
            time.sleep(0.01)
        assert list(out.parent.iterdir()) == []  # no listing, no partial state while it waits
        os.close(lock)  # as the other fetch ending would
        waiting.join(timeout=120)
    assert errors == [] and not waiting.is_alive()
    _in_memory(root, tmp_path / "in_memory", tmp_path, image_size=6)
    _same_folder(out, tmp_path / "in_memory")


# ---------------------------------------------------------------------------- real signals, real stage


def _slow_folder(root: Path, n: int) -> None:
    """`n` PNGs in 3 classes that take a few ms each to decode (256 x 256, blocky, so 1 KB on
    disk), 64 different ones in a random order, so that a misplaced image shows."""
    rng = np.random.default_rng(0)
    variants = []
    for i in range(64):
        block = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        path = root / f"variant_{i}.png"
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(block).resize((256, 256), Image.Resampling.NEAREST).save(path)
        variants.append(path.read_bytes())
        path.unlink()
    for i, pick in enumerate(rng.integers(0, len(variants), size=n)):
        path = root / ("ant", "bee", "cat")[i % 3] / f"img_{i:05d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(variants[pick])


def _project(tmp_path: Path, n: int) -> Path:
    project = tmp_path / "project"
    shutil.copytree(REPO / "conf", project / "conf")
    _slow_folder(project / "images", n)
    cfg = compose(["data=imagefolder", "data.path=images", "data.image_size=8", "data.num_workers=1"],
                  conf=project / "conf")
    OmegaConf.save(cfg, project / "params.yaml", resolve=True)
    return project


def _fetch_stage(project: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli.stages", "fetch", "params.yaml"], cwd=project,
                            env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_progress(proc: subprocess.Popen, done_file: Path, timeout: float = 300) -> int:
    """Until the fetch has saved some progress; the images saved."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the fetch ended ({proc.returncode}) before it saved progress: " \
                                    f"make the folder bigger\n{proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no progress saved"
        try:
            done = json.loads(done_file.read_text())["images"]
        except (OSError, ValueError):
            done = 0
        if done > 0:
            return done
        time.sleep(0.02)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [
    pytest.param(signal.SIGTERM, 143, marks=pytest.mark.fault(
        "1. Fetch process killed", fault="SIGTERM to the fetch stage part-way through a 2,400-PNG image folder",
        expected="exit 143 with the progress saved; the rerun resumes there; data/raw byte-identical to an "
                 "uninterrupted fetch")),
    pytest.param(signal.SIGKILL, -signal.SIGKILL, marks=pytest.mark.fault(
        "1. Fetch process killed", fault="SIGKILL to the fetch stage part-way through a 2,400-PNG image folder",
        expected="the rerun resumes from the last saved image (at most ~1 s of work lost); data/raw "
                 "byte-identical to an uninterrupted fetch")),
], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_fetch_stage_resumes_to_the_same_dataset(tmp_path, sig, status, observe):
    n = 2400
    project = _project(tmp_path, n)
    out = project / "data" / "raw" / "imagefolder"
    done_file = imagefolder.partial_folder(out) / imagefolder.DONE

    proc = _fetch_stage(project)
    seen = _wait_for_progress(proc, done_file)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    saved = json.loads(done_file.read_text())["images"]
    observe.saw(f"exit {proc.returncode} with {saved} of {n} images saved")
    assert proc.returncode == status, stderr[-2000:]
    assert seen <= saved < n and not out.exists()
    if sig == signal.SIGTERM:
        assert f"fetch stopped at image {saved} of {n}; run it again to resume" in stderr, stderr[-2000:]

    again = _fetch_stage(project)
    _, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-3000:]
    assert f"resuming the interrupted fetch of {project / 'images'} at image {saved} of {n}" in stderr, stderr
    assert f"{n - saved} to decode" in stderr and f"fetched {n} images ({n - saved} decoded by this run)" in stderr
    assert not imagefolder.partial_folder(out).exists()

    fetch("imagefolder", out_dir=tmp_path / "uninterrupted", download_dir=tmp_path, path=project / "images",
          image_size=8, channels=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["path"] == str(project / "images")
    manifest["source"]["path"] = "?"
    uninterrupted = json.loads((tmp_path / "uninterrupted" / "manifest.json").read_text())
    uninterrupted["source"]["path"] = "?"
    for name in FILES[:3]:
        assert (out / name).read_bytes() == (tmp_path / "uninterrupted" / name).read_bytes(), name
    assert manifest == uninterrupted
    observe.saw(f"rerun resumed at image {saved}, decoded {n - saved}; data/raw equals an uninterrupted fetch's")
    observe.lost()
