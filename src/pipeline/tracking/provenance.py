"""Where a run came from: git commit, and the content hash of the data split it used."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml


def git_commit(root: Path) -> dict[str, str]:
    """`{"git_commit": sha, "git_dirty": "true"|"false"}`, or `{}` outside a git repository."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": sha, "git_dirty": str(bool(dirty)).lower()}


def dvc_out_hash(root: Path, stage: str, out_path: Path) -> str | None:
    """The md5 DVC recorded in dvc.lock for one output of a stage (None if not recorded)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    rel = out_path.resolve().relative_to(root.resolve()).as_posix() if out_path.is_absolute() else out_path.as_posix()
    for out in stages.get(stage, {}).get("outs", []):
        if out.get("path") == rel:
            return out.get("md5")
    return None


def tree_sha256(folder: Path) -> str:
    """A content hash of every file in a folder (names and bytes), independent of DVC."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
