"""Fault scenarios 5 (broken inputs) and 6 (a full disk) of issue #13, through real processes.

Each broken input is one real command in a copy of a small DVC project: `pipeline train`, or a
stage as dvc.yaml runs it (`python -m pipeline.cli.stages <stage> params.yaml`). Each must exit
2 with a message naming the file and the fix, and leave the project exactly as it was: every
file byte for byte (the previous model, metrics and plots included), and no new MLflow run.
The library's own checks of each format have unit tests (test_store, test_sources); these
check what a user sees.

The full disk is a small tmpfs mounted as the outputs folder, filled up while `train` runs:
the stage must stop with "no space left" naming the folder, and the checkpoints written before
must still load (every output is written to a temporary file beside it, fsynced and renamed
over the old one: `pipeline.files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from fixtures_formats import write_image_folder
from pipeline.config import compose
from procs import BIN, project_env

REPO = Path(__file__).resolve().parents[1]
# A small, quick configuration: the base project trains it once; the broken inputs stop it
# long before it would train.
SMALL = ["model=mlp", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "tune.use_best=false"]
# A stage that would run until stopped (here: by the full disk), into out/. Its checkpoints
# (7 MB) are far larger than the MLflow store, so that the file-size limit of the no-mount
# fallback stops a checkpoint, not the store's next write.
LONG = ["model=mlp", "model.hidden_sizes=[1024,512]", "trainer.max_epochs=1000",
        "regularizer.early_stopping.enabled=false", "trainer.enable_progress_bar=false", "tune.use_best=false",
        "paths.out_dir=out"]


def _save_params(project: Path, overrides: list[str]) -> None:
    OmegaConf.save(compose(overrides, conf=project / "conf"), project / "params.yaml", resolve=True)


def _run(project: Path, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=project, env=project_env(), capture_output=True, text=True,
                          timeout=timeout)


def _stage(project: Path, stage: str) -> subprocess.CompletedProcess:
    return _run(project, sys.executable, "-m", "pipeline.cli.stages", stage, "params.yaml")


def _files(project: Path) -> dict[str, str]:
    """Every file of the project but git's and DVC's own, and the data store's record of a
    checksum it verified (`data/raw/.<name>.verified.json`: written by the first read of a
    copied, unchanged dataset, a cache of a passed check rather than an output), by content hash."""
    return {p.relative_to(project).as_posix(): sha256(p.read_bytes()).hexdigest()
            for p in sorted(project.rglob("*")) if p.is_file() and p.relative_to(project).parts[0] not in (".git", ".dvc")
            and not (p.parent.name == "raw" and p.name.endswith(".verified.json"))}


def _runs(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return [status for (status,) in con.execute("SELECT status FROM runs ORDER BY start_time")]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC project in git with the real fetch, split, train and evaluate stages (their code
    deps left out: this is about data files, not about which code a stage reads), digits
    fetched and split, dvc.lock recording both (`dvc commit`), and an MLP trained once by
    the train task (models/, metrics/, plots/ and one MLflow run): the previous outputs that
    a refused command must leave alone."""
    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.train import train

    project = tmp_path_factory.mktemp("inputs") / "project"
    project.mkdir()
    for rel in (".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, project / rel)
    shutil.copytree(REPO / "conf", project / "conf")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    kept = {name: stages[name] for name in ("fetch", "split", "train", "evaluate")}
    for stage in kept.values():
        stage["deps"] = [d for d in stage["deps"] if d.startswith(("data/", "models"))]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": kept}, sort_keys=False))
    _save_params(project, SMALL)

    cfg = OmegaConf.load(project / "params.yaml")
    with open_dict(cfg):
        cfg.paths.root = str(project)  # as the stages find it from their working directory
    ensure_data(cfg)
    train(cfg)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"],
                [str(BIN / "dvc"), "commit", "-f", "fetch", "split"]):
        subprocess.run(cmd, cwd=project, env=project_env(), check=True, capture_output=True)
    return project


# ---------------------------------------------------------------------------- scenario 5: broken inputs

@dataclass
class Broken:
    """What a case broke, the command it runs, and what the message must say."""

    command: Callable[[Path], subprocess.CompletedProcess]
    says: list[str]
    noted: str = ""  # anything else observed on the way (e.g. what DVC made of it)


def _truncated_images(project: Path) -> Broken:
    images = project / "data/raw/digits/images.npy"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    # The ad-hoc command: it reads the same data folder before training.
    return Broken(lambda p: _run(p, BIN / "pipeline", "train", *SMALL), [str(images), "truncated", "dvc repro fetch"])


def _manifest_mismatch(project: Path) -> Broken:
    labels = project / "data/raw/digits/labels.npy"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 0x01  # one label changed, same size: only the hash can tell
    labels.write_bytes(bytes(data))
    return Broken(lambda p: _stage(p, "split"), [str(labels), "sha256 mismatch", "dvc repro fetch"])


def _image_folder(project: Path) -> Path:
    """A small image folder (3 classes of 8 PNGs) and params.yaml pointing the data at it."""
    root = project / "images"
    write_image_folder(root, ["ant", "bee", "cat"], n_per_class=8, size=(8, 8), mode="L")
    _save_params(project, [*SMALL, "data=imagefolder", "data.path=images", "data.image_size=8", "data.channels=1",
                           "data.num_workers=0"])
    return root


def _corrupt_png(project: Path) -> Broken:
    bad = _image_folder(project) / "bee" / "img_003.png"
    bad.write_bytes(bad.read_bytes()[:40])  # the header survives, the pixels do not
    return Broken(lambda p: _stage(p, "fetch"), [str(bad), "cannot be decoded", "delete or replace the file"])


def _empty_class(project: Path) -> Broken:
    empty = _image_folder(project) / "dog"
    empty.mkdir()
    return Broken(lambda p: _stage(p, "fetch"), [str(empty), "has no images", "add images or remove the folder"])


def _non_image(project: Path) -> Broken:
    root = _image_folder(project)
    # A download that saved an error page under an image's name; and a note beside the images,
    # which is skipped (as torchvision does) but said so.
    page = root / "cat" / "img_100.jpg"
    page.write_text("<html><body>404 Not Found</body></html>\n")
    (root / "ant" / "notes.txt").write_text("collected in June\n")
    return Broken(lambda p: _stage(p, "fetch"), [str(page), "cannot be decoded", "delete or replace the file",
                                                 "skipped 1 file(s) without an image extension"])


def _params_wrong_type(project: Path) -> Broken:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["trainer"]["max_epochs"] = "ten"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return Broken(lambda p: _stage(p, "train"), ["params.yaml", "trainer.max_epochs must be an integer, got 'ten'",
                                                 "pipeline params", "dvc exp run -S"])


def _truncated_dvc_lock(project: Path) -> Broken:
    """Cut inside the split's recorded md5, as a full disk or a crash while DVC wrote it would:
    still valid YAML, so only the hash's form tells. The pipeline reads dvc.lock in one place,
    the provenance tags of a run (`dvc_split_md5`); DVC reads it for status and repro."""
    lock = project / "dvc.lock"
    text = lock.read_text()
    split = text.index("  split:")
    cut = text.index("md5: ", text.index("outs:", split)) + len("md5: ") + 10
    lock.write_text(text[:cut])
    status = _run(project, BIN / "dvc", "status")
    said = " ".join((status.stdout + status.stderr).split())
    return Broken(lambda p: _stage(p, "train"), [str(lock), "is no md5", "git checkout dvc.lock"],
                  noted=f"`dvc status` exits {status.returncode}: {said[:90]}")


def _other_architecture(project: Path) -> Broken:
    source = project / "models" / "best.ckpt"  # the MLP the base project trained
    _save_params(project, [*SMALL, "model=lenet5", f"transfer.source={source}"])
    return Broken(lambda p: _stage(p, "train"), [str(source), "holds a mlp checkpoint", "model lenet5", "model=mlp"])


def _other_data(project: Path) -> Broken:
    """The digits MLP's best.ckpt (10 classes) evaluated on a 3-class image folder."""
    from pipeline.tasks.data import ensure_data

    _image_folder(project)
    cfg = OmegaConf.load(project / "params.yaml")
    with open_dict(cfg):
        cfg.paths.root = str(project)
    ensure_data(cfg)  # this case's data is fine: it is the checkpoint that does not fit it
    return Broken(lambda p: _stage(p, "evaluate"), [str(project / "models" / "best.ckpt"), "in 10 classes",
                                                    "in 3 classes", "dvc repro train"])


def _case(name: str, make: Callable[[Path], Broken], fault: str, expected: str):
    return pytest.param(make, id=name, marks=pytest.mark.fault("5. Broken inputs", fault=fault, expected=expected))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("make", [
    _case("truncated-images", _truncated_images, "images.npy cut to half its size; `pipeline train`",
          "exit 2 naming images.npy and `dvc repro fetch`; no run folder, no run"),
    _case("manifest-mismatch", _manifest_mismatch, "one byte of labels.npy changed (same size); split stage",
          "exit 2 naming labels.npy (sha256 mismatch) and the fix; previous split intact"),
    _case("corrupt-png", _corrupt_png, "a PNG cut after 40 bytes (data=imagefolder); fetch stage",
          "exit 2 naming the PNG; no data/raw/imagefolder written"),
    _case("empty-class", _empty_class, "an empty class folder (data=imagefolder); fetch stage",
          "exit 2 naming the folder and the fix; nothing written"),
    _case("non-image", _non_image, "an HTML page saved as .jpg, and a notes.txt, in class folders; fetch stage",
          "exit 2 naming the .jpg; the .txt skipped with a warning; nothing written"),
    _case("params-wrong-type", _params_wrong_type, "params.yaml with trainer.max_epochs: ten; train stage",
          "exit 2 naming params.yaml, the key and the fix; previous model intact"),
    _case("truncated-dvc-lock", _truncated_dvc_lock, "dvc.lock cut inside the split's md5; train stage (and dvc status)",
          "exit 2 naming dvc.lock and the fix; no run, previous model intact"),
    _case("other-architecture", _other_architecture, "transfer.source = an MLP's best.ckpt for model=lenet5; train stage",
          "exit 2 naming the checkpoint, its architecture and the fix; no run"),
    _case("checkpoint-of-other-data", _other_data, "evaluate stage: the digits MLP's best.ckpt on a 3-class image folder",
          "exit 2 naming best.ckpt and the fix; no metrics or plots overwritten"),
])
def test_broken_input_is_refused_and_nothing_is_written(base: Path, tmp_path: Path, make, observe):
    project = shutil.copytree(base, tmp_path / "project", symlinks=True)
    broken = make(project)
    before, runs_before = _files(project), _runs(project / "mlflow.db")

    done = broken.command(project)

    error = next((line for line in done.stderr.splitlines() if line.startswith("error: ")), done.stderr[-300:])
    observe.saw(f"exit {done.returncode}: {error.replace(f'{project}/', '')[:170]}")
    if broken.noted:
        observe.saw(broken.noted)
    warned = next((line for line in done.stderr.splitlines() if "skipped" in line), None)
    if warned:
        observe.saw(f"warned: {warned.replace(f'{project}/', '')[:110]}")
    after = _files(project)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    checkpoints = [k for k in changed if k.endswith(".ckpt")]
    runs_after = _runs(project / "mlflow.db")
    observe.saw("nothing written" if not changed and runs_after == runs_before
                else f"changed: {changed[:5]}, runs {runs_before} -> {runs_after}")
    lost = observe.lost(runs=abs(len(runs_after) - len(runs_before)) + sum(a != b for a, b in zip(runs_before, runs_after)),
                        checkpoints=len(checkpoints), outputs=len(changed) - len(checkpoints))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for words in broken.says:
        assert words in done.stderr, f"{words!r} not in: {done.stderr[-2000:]}"
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}, changed


# ---------------------------------------------------------------------------- scenario 6: a full disk

def _sudo() -> list[str] | None:
    """How to mount here: directly as root, through passwordless sudo (CI runners), or not at all."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


@contextlib.contextmanager
def _small_disk(folder: Path, size: str) -> Iterator[bool]:
    """`folder` as a tmpfs of `size`, unmounted on the way out; yields False (and mounts
    nothing) where mounting is not permitted, for the caller's fallback."""
    folder.mkdir(parents=True, exist_ok=True)
    sudo = _sudo()
    mounted = sudo is not None and subprocess.run(
        [*sudo, "mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run([*(sudo or []), "umount", "-l", str(folder)], check=True, capture_output=True)


def _fill(folder: Path) -> int:
    """Write a file into `folder` until its disk is full; the bytes written."""
    written = 0
    with contextlib.suppress(OSError), (folder / "filler").open("wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            n = f.write(chunk)
            written += n
            if n < len(chunk):  # a short write: the last bytes that fitted
                break
    with contextlib.suppress(OSError), (folder / "filler-tail").open("wb", buffering=0) as f:
        while f.write(b"\0" * 512):  # what a 64 KiB chunk left over
            written += 512
    return written


def _ignore_sigxfsz() -> None:
    # The fallback's file-size limit is hit as an error (EFBIG), not as a signal that kills.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.fault("6. Full disk", fault="the outputs' tmpfs (32 MB) filled up while the train stage writes checkpoints",
                   expected="exit 2 naming the folder and 'no space'; best.ckpt and last.ckpt from before load; "
                            "config.yaml, indices.npz intact; no temporary or half-written file; run FAILED")
def test_full_disk_during_training_keeps_the_previous_checkpoints(base: Path, tmp_path: Path, observe):
    from pipeline.training.network import load_network

    project = shutil.copytree(base, tmp_path / "project", symlinks=True)
    _save_params(project, LONG)
    out = project / "out"
    models = out / "models"
    log = tmp_path / "train.log"
    with _small_disk(out, "32m") as mounted, log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.stages", "train", "params.yaml"], cwd=project,
                                env=project_env(), stdout=sink, stderr=subprocess.STDOUT, preexec_fn=_ignore_sigxfsz)
        try:
            deadline = time.monotonic() + 300
            while not (models / "last.ckpt").exists() or not (models / "best.ckpt").exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            kept = {name: (models / name).read_bytes() for name in ("config.yaml", "indices.npz")}
            if mounted:
                how = f"tmpfs mounted; {_fill(out) // 1024} KiB filler"
            else:
                # No mount here (no root, no sudo): the same failing write, by a file-size limit on
                # the running stage below the size of a checkpoint (EFBIG instead of ENOSPC).
                limit = (models / "last.ckpt").stat().st_size // 2
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
                how = f"no mount permitted: RLIMIT_FSIZE={limit} B set on the running stage"
            status = proc.wait(timeout=300)
        finally:
            proc.kill()
            proc.wait()
        text = log.read_text()
        leftovers = sorted(p.name for p in models.iterdir() if p.name.startswith("."))
        loads = {}
        for name in ("best.ckpt", "last.ckpt"):
            try:
                loads[name] = load_network(models / name) is not None
            except Exception as err:  # what a reader of a half-written checkpoint would meet
                loads[name] = False
                observe.saw(f"{name} does not load: {type(err).__name__}")
        last_epoch = torch.load(models / "last.ckpt", weights_only=True)["epoch"] if loads["last.ckpt"] else -1
        unchanged = {name: (models / name).read_bytes() == data for name, data in kept.items()}
        half_written = [p.name for p in (out / "metrics", out / "plots") if p.exists()]
    runs = _runs(project / "mlflow.db")
    with contextlib.closing(sqlite3.connect(project / "mlflow.db")) as con:
        [(logged,)] = con.execute("SELECT COUNT(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                                  "WHERE m.key = 'val/acc' AND r.start_time = (SELECT MAX(start_time) FROM runs)")
    error = next((line for line in text.splitlines() if line.startswith("error: ")), text[-300:])
    observe.saw(how)
    observe.saw(f"exit {status}: {error.replace(f'{project}/', '')[:150]}")
    observe.saw(f"run {runs[-1]}, {logged} epochs logged, last.ckpt of epoch {last_epoch}")
    lost = observe.lost(runs=int(runs[-1] != "FAILED"), metrics=max(0, last_epoch + 1 - logged),
                        checkpoints=sum(not ok for ok in loads.values()),
                        outputs=sum(not ok for ok in unchanged.values()) + len(leftovers) + len(half_written))
    assert status == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert str(models) in text and ("no space left" if mounted else "file size limit") in text, text[-2000:]
    assert leftovers == [] and half_written == [], (leftovers, half_written)
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}
    assert not mounted or not os.path.ismount(out)


def test_an_output_written_on_a_full_disk_keeps_its_previous_content(tmp_path: Path):
    """`pipeline.files` on a real full disk, in this process: the JSON, figure and split writers
    all go through it."""
    from pipeline.errors import OutputError
    from pipeline.files import write_text

    target = tmp_path / "disk"
    with _small_disk(target, "64k") as mounted:
        if not mounted:  # the same refusal by a file-size limit, in a child process
            child = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(target)], env=project_env(),
                                   capture_output=True, text=True, preexec_fn=_ignore_sigxfsz)
            assert child.returncode == 0, child.stderr
            return
        path = write_text(target / "metrics.json", '{"acc": 0.9}\n')
        _fill(target)
        with pytest.raises(OutputError, match="no space left") as err:
            write_text(path, json.dumps({"acc": 0.95, "curve": list(np.arange(20000.0))}))
        assert str(target) in str(err.value)
        assert path.read_text() == '{"acc": 0.9}\n'
        assert sorted(p.name for p in target.iterdir()) == ["filler", "filler-tail", "metrics.json"]


_FSIZE_CHILD = """
import resource, sys
from pathlib import Path
from pipeline.errors import OutputError
from pipeline.files import write_text
folder = Path(sys.argv[1])
path = write_text(folder / "metrics.json", '{"acc": 0.9}\\n')
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_text(path, "x" * 10000)
except OutputError as err:
    assert "file size limit" in str(err), err
else:
    raise SystemExit("no OutputError")
assert path.read_text() == '{"acc": 0.9}\\n'
assert [p.name for p in folder.iterdir()] == ["metrics.json"]
"""


# ---------------------------------------------------------------------------- the readers, cut anywhere

LOCK = """schema: '2.0'
stages:
  split:
    cmd: python -m pipeline.cli.stages split
    deps:
    - path: data/raw/digits
      hash: md5
      md5: 254713f39da19b588087d525e78f60e6.dir
      size: 130825
      nfiles: 4
    outs:
    - path: data/splits/digits
      hash: md5
      md5: 7c2fe19f80104929e764efad5816f6e2.dir
      size: 29751
      nfiles: 5
"""


def test_a_dvc_lock_cut_anywhere_gives_the_whole_md5_none_or_the_fix(tmp_path: Path):
    """The pipeline's one reader of dvc.lock (a run's `dvc_split_md5` tag), on the lock cut
    after every character: never half an md5, never a traceback."""
    from pipeline.errors import DataError
    from pipeline.tracking.provenance import dvc_out_hash

    (tmp_path / "data/splits/digits").mkdir(parents=True)
    seen = set()
    for cut in range(len(LOCK) + 1):
        (tmp_path / "dvc.lock").write_text(LOCK[:cut])
        try:
            seen.add(dvc_out_hash(tmp_path, "split", tmp_path / "data/splits/digits"))
        except DataError as err:
            assert "dvc.lock" in str(err) and "git checkout dvc.lock" in str(err)
            seen.add("refused")
    assert seen == {None, "7c2fe19f80104929e764efad5816f6e2.dir", "refused"}


def test_params_yaml_that_is_not_yaml_names_the_file_and_the_fix(tmp_path: Path):
    from pipeline.config import load_params
    from pipeline.errors import ConfigError

    params = tmp_path / "params.yaml"
    for text in ("trainer: {max_epochs: 2\n", "- a list\n", "seed: 1\n\tmodel: mlp\n"):
        params.write_text(text)
        with pytest.raises(ConfigError, match="pipeline params") as err:
            load_params(params)
        assert str(params) in str(err.value)
