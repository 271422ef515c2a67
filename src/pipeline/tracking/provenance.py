"""Where a run came from: git commit, entry point, and the content hash of the data split it used."""

from __future__ import annotations

import getpass
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.errors import DataError

GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the UI's Source column and run page show it


def git_commit(root: Path) -> dict[str, str]:
    """`{"git_commit": sha, "git_dirty": "true"|"false"}` and MLflow's own commit tag, or `{}`
    outside a git repository."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": sha, "git_dirty": str(bool(dirty)).lower(), GIT_COMMIT_TAG: sha}


def source_tags() -> dict[str, str]:
    """MLflow's own tags for the program that starts a run, as `mlflow.start_run` sets them
    (we create runs through the client, which sets none): its entry point (the script, and
    the subcommand: `.../bin/pipeline train`), a local source, and the user."""
    argv = [a for a in sys.argv if a]
    name = argv[0] if argv else "<console>"
    if len(argv) > 1 and argv[1].isidentifier():  # a subcommand (`train`), not an override (`a=b`)
        name = f"{name} {argv[1]}"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (a container)
        user = "unknown"
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL", "mlflow.user": user}


def dvc_out_hash(root: Path, stage: str, out_path: Path) -> str | None:
    """The md5 DVC recorded in dvc.lock for one output of a stage (None if not recorded).
    A dvc.lock cut short (a full disk, a crash while DVC wrote it, a bad merge) is a
    DataError naming the fix: read as it is, it could yield half an md5 for the run's tags."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    try:
        data = yaml.load(lock.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{lock} is not valid YAML ({' '.join(str(err).split())[:200]}): " + _LOCK_FIX) from err
    stages = data.get("stages", {}) if isinstance(data, dict) else None
    entry = stages.get(stage) if isinstance(stages, dict) else None
    if stages is None or (entry is not None and not isinstance(entry, dict)):
        raise DataError(f"{lock} does not hold DVC's stage records: " + _LOCK_FIX)
    rel = out_path.resolve().relative_to(root.resolve()).as_posix() if out_path.is_absolute() else out_path.as_posix()
    for out in (entry or {}).get("outs") or []:
        if isinstance(out, dict) and out.get("path") == rel:
            md5 = out.get("md5")
            # DVC's md5 of a folder ends in ".dir": without it, a cut may have taken it off.
            form = _DIR_MD5 if out_path.is_dir() else _MD5
            if md5 is not None and not (isinstance(md5, str) and form.fullmatch(md5)):
                raise DataError(f"{lock} records md5 {md5!r} for {rel}, which is no md5: " + _LOCK_FIX)
            return md5
    return None


# libyaml's safe loader where PyYAML has it: dvc.lock holds every stage's dependencies (3000
# lines), which the pure-Python loader takes 0.2 s to read, in every training and evaluation.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MD5 = re.compile(r"[0-9a-f]{32}")
_DIR_MD5 = re.compile(r"[0-9a-f]{32}\.dir")
_LOCK_FIX = ("it is truncated or corrupt. Restore it with `git checkout dvc.lock`, or delete it and run "
             "`dvc repro` (or `dvc commit`) to record the stages again.")


def tree_sha256(folder: Path) -> str:
    """A content hash of every file in a folder (names and bytes), independent of DVC."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
