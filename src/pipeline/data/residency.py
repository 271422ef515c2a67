"""Whether a run holds the prepared images in memory or memory-maps them (`data.in_memory`).

Memory-mapped, a batch reads only its own images, through the page cache: once the cache holds
the file the batches are made about as fast as from memory (`bench/scale.py`), one cached copy
serves every process on the machine that reads the file (DDP ranks, Ray trials, parallel folds),
and the kernel drops those pages again when memory runs short. Held in memory, the array is read
whole before the first step and each process keeps its own copy, which no one can reclaim.

So `auto` holds the images in memory only where that is cheap: at most `MAX_BYTES` (read whole
in about a second from the cache) and at most `1/MAX_SHARE` of the memory available when the run
starts (a machine often runs several trainings at once, each with its own copy, beside their
models and the page cache). Every dataset that ships with the pipeline (digits: 0.1 MB; CIFAR-10:
184 MB) is then held in memory; a downsampled ImageNet (15.7 GB at 64 px) is memory-mapped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.config import check_auto_bool

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 30
MAX_SHARE = 8
SETTINGS = ("auto", True, False)


def available_memory() -> int | None:
    """Bytes of memory available to a new process (Linux's MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unixes: free physical pages (less than what could be reclaimed)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_in_memory(setting: object) -> None:
    """ConfigError unless `setting` is a valid `data.in_memory` value."""
    check_auto_bool(setting, "data.in_memory", "auto holds small datasets in memory and memory-maps large ones; "
                    "true or false forces one.")


def check_device_cache(setting: object) -> None:
    """ConfigError unless `setting` is a valid `data.device_cache` value."""
    check_auto_bool(setting, "data.device_cache", "auto caches the images on a CUDA device when they take at most "
                    "1/4 of its free memory; true or false forces it (true on the CPU batches there with the same "
                    "code).")


def choose_in_memory(setting: bool | str, nbytes: int) -> tuple[bool, str]:
    """(whether to hold `nbytes` of images in memory, why) for `data.in_memory=setting`."""
    check_in_memory(setting)
    size = f"{nbytes / 1e6:,.1f} MB of images"
    if isinstance(setting, bool):
        return setting, f"{size}, {'held in memory' if setting else 'memory-mapped'} (data.in_memory={str(setting).lower()})"
    available = available_memory()
    limit = MAX_BYTES if available is None else min(MAX_BYTES, available // MAX_SHARE)
    keep = nbytes <= limit
    return keep, (f"{size}, {'held in memory' if keep else 'memory-mapped'} (data.in_memory=auto: "
                  f"{'at most' if keep else 'more than'} the in-memory limit of {limit / 1e6:,.0f} MB, "
                  f"the smaller of {MAX_BYTES / 1e6:,.0f} MB and 1/{MAX_SHARE} of the "
                  f"{'unknown' if available is None else f'{available / 1e9:,.1f} GB'} available)")
