"""Raw-file bookkeeping for downloadable datasets: locate, download, md5-verify.

Kept apart from ``sources.py`` so the per-dataset loaders there stay short: a loader only
describes its files with a ``RawFiles`` and calls ``obtain``. Downloads go through
torchvision's helpers (redirects, retries over http, archive extraction) rather than a
second hand-written downloader.
"""

from __future__ import annotations

import http.client
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.store import file_digest
from pipeline.errors import DataError

# What a failed download can raise: URLError/socket errors are OSErrors, torchvision raises
# RuntimeError on a bad md5, a cut connection can raise HTTPException, a bad archive TarError.
DOWNLOAD_ERRORS = (OSError, RuntimeError, http.client.HTTPException, tarfile.TarError, EOFError)


@dataclass(frozen=True)
class RawFiles:
    """Where one dataset's original files must be, their checksums and how to download them."""

    dataset: str
    folder: Path
    required: tuple[tuple[str, ...], ...]  # one entry per file: accepted names, preferred first
    md5: Mapping[str, str]  # filename -> expected md5 (unknown names are not checked)
    urls: tuple[str, ...]
    # Called with the preferred names of the missing files and the md5 table to check them with.
    download: Callable[[list[str], Mapping[str, str]], None]
    hint: str = ""

    def resolve(self) -> dict[str, Path | None]:
        return {
            names[0]: next((self.folder / n for n in names if (self.folder / n).is_file()), None)
            for names in self.required
        }

    def offline_help(self, missing: list[str]) -> str:
        folder = self.folder.absolute()
        alts = {names[0]: names[1:] for names in self.required}
        lines = [
            f"  {folder / name}" + "".join(f"  (or {a})" for a in alts.get(name, ()))
            for name in missing
        ]
        return (
            f"To use {self.dataset} offline, place these files in {folder}:\n"
            + "\n".join(lines)
            + f"\nThey are published at: {', '.join(self.urls)}"
            + (f"\n{self.hint}" if self.hint else "")
        )


def obtain(
    spec: RawFiles, *, download: bool, checksums: Mapping[str, str]
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Make sure every required file is present (downloading if allowed) and md5-verified."""
    found = spec.resolve()
    missing = [name for name, path in found.items() if path is None]
    if missing and not download:
        raise DataError(
            f"{spec.dataset}: {len(missing)} raw file(s) missing and download is disabled.\n"
            + spec.offline_help(missing)
        )
    expected = {**spec.md5, **checksums}
    if missing:
        try:
            spec.download(missing, expected)
        except DOWNLOAD_ERRORS as e:
            raise DataError(
                f"{spec.dataset}: download failed ({type(e).__name__}: {e}).\n"
                + spec.offline_help(missing)
            ) from e
        found = spec.resolve()
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise DataError(
                f"{spec.dataset}: download finished but files are still missing.\n"
                + spec.offline_help(missing)
            )
    md5s, unverified = {}, []
    for path in found.values():
        assert path is not None
        actual = file_digest(path, "md5")
        want = expected.get(path.name)
        if want is None:
            unverified.append(path.name)
        elif actual != want.lower():
            raise DataError(
                f"{path}: md5 mismatch (expected {want}, got {actual}): the file is corrupt, "
                "incomplete or a different version. Delete it so it is downloaded again, or "
                "place an intact copy there."
            )
        md5s[path.name] = actual
    info: dict[str, Any] = {"files_md5": md5s}
    if unverified:
        info["unverified_files"] = unverified  # no known checksum (e.g. already-unzipped IDX)
    return {k: v for k, v in found.items() if v is not None}, info


def download_file(url: str, folder: Path, filename: str, md5: str | None, *, extract: bool) -> None:
    """Download one file with torchvision, deleting a partial file if the download fails."""
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    target = folder / filename
    existed = target.exists()
    try:
        if extract:
            download_and_extract_archive(url, download_root=folder, filename=filename, md5=md5)
        else:
            download_url(url, root=folder, filename=filename, md5=md5)
    except BaseException:
        if not existed:
            target.unlink(missing_ok=True)  # a half-downloaded file must not look like a real one
        raise
