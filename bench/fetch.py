"""The image-folder fetch: images per second, and peak memory that must not grow with the count.

Writes ``--classes`` class folders of random 32x32 RGB PNGs (noise: about as compressible as
small photos, 3.2 KB each) into a temporary folder, as many as the largest ``--sizes``; the
smaller folders hard-link the first files of each class. Each size is then fetched by the
pipeline's own fetch (``pipeline.data.fetch("imagefolder", ...)``: list, decode in threads,
write in chunks, publish) in a fresh process, which reports:

- images/s: images over the fetch's wall time (listing, decoding, hashing, publishing; the
  PNGs are in the page cache, just written), and its CPU time per image (user + system, all
  threads), which other jobs on the machine do not inflate as they do the wall time;
- peak memory: the process's ``VmHWM`` (the kernel's high-water mark of its resident memory,
  file pages it maps included) and the peak of ``RssAnon`` (its own heap, sampled every 10 ms).

``--in-memory`` also runs the path the fetch took before it streamed (decode the whole folder
into one array with ``load_source``, then ``write_raw``) for comparison.

    .venv/bin/python bench/fetch.py [--sizes 5000 20000] [--workers 4] [--in-memory]

Last line: ``fetch: N images, X images/s, peak memory 20k/5k Y.YY`` (the VmHWM ratio of the
streamed fetch at the largest size to the smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CLASSES = 10


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _child(mode: str, root: Path, out: Path, size: int, workers: int | None) -> dict:
    """One fetch in this (fresh) process; its figures."""
    from pipeline.data import fetch, load_source
    from pipeline.data.store import write_raw

    peak_anon, stop = [_status_kb("RssAnon")], threading.Event()
    base = {"rss_anon_kb": peak_anon[0], "vm_hwm_kb": _status_kb("VmHWM")}

    def sample() -> None:
        while not stop.wait(0.01):
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu, start = time.process_time(), time.perf_counter()
    if mode == "streamed":
        manifest = fetch("imagefolder", out_dir=out, download_dir=out.parent, path=root, image_size=size,
                         channels=3, workers=workers)
    else:
        images, labels, classes, info = load_source("imagefolder", download_dir=out.parent, path=root,
                                                    image_size=size, channels=3)
        manifest = write_raw(out, images, labels, classes, dataset="imagefolder", source=info)
        del images
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    stop.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))
    return {"mode": mode, "images": manifest["num_samples"], "seconds": seconds, "cpu_s": cpu,
            "vm_hwm_kb": _status_kb("VmHWM"), "rss_anon_peak_kb": peak_anon[0], "base": base,
            "sha256": manifest["files"]["images.npy"]["sha256"]}


def _generate(root: Path, count: int, classes: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def _subset(full: Path, root: Path, count: int, classes: int) -> None:
    """The first `count / classes` images of each class of `full`, hard-linked."""
    for folder in sorted(full.iterdir()):
        (root / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[: count // classes]:
            os.link(path, root / folder.name / path.name)


def _run(mode: str, root: Path, out: Path, size: int, workers: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(root), str(out), str(size), str(workers or 0)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} fetch of {root} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="image counts to fetch")
    parser.add_argument("--classes", type=int, default=CLASSES, help="class folders")
    parser.add_argument("--image-size", type=int, default=32, help="data.image_size: the PNGs are 32x32")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (default: data.num_workers of conf/data/imagefolder.yaml)")
    parser.add_argument("--in-memory", action="store_true", help="also run the pre-streaming in-memory path")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, root, out, size, workers = args.child
        line = json.dumps(_child(mode, Path(root), Path(out), int(size), int(workers) or None))
        print(line)
        return line

    sizes = sorted(args.sizes)
    workers = args.workers if args.workers is not None else _configured_workers()
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    try:
        full = tmp / f"images_{sizes[-1]}"
        start = time.perf_counter()
        _generate(full, sizes[-1], args.classes)
        print(f"wrote {sizes[-1]} PNGs (32x32 RGB, {args.classes} classes) in {time.perf_counter() - start:.0f} s",
              flush=True)
        rows = []
        for count in sizes:
            root = full if count == sizes[-1] else tmp / f"images_{count}"
            if root != full:
                _subset(full, root, count, args.classes)
            for mode in ("streamed", "in-memory") if args.in_memory else ("streamed",):
                row = _run(mode, root, tmp / "raw" / f"{mode}_{count}", args.image_size, workers)
                rows.append(row)
                print(f"{mode:>9} {row['images']:>7} images: {row['images'] / row['seconds']:>6.0f} images/s "
                      f"({row['seconds']:.1f} s; CPU {1e6 * row['cpu_s'] / row['images']:.0f} us/image), VmHWM {row['vm_hwm_kb'] / 1024:.0f} MB, RssAnon peak "
                      f"{row['rss_anon_peak_kb'] / 1024:.0f} MB (after imports: VmHWM "
                      f"{row['base']['vm_hwm_kb'] / 1024:.0f} MB, RssAnon {row['base']['rss_anon_kb'] / 1024:.0f} MB)",
                      flush=True)
            shutil.rmtree(tmp / "raw")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    end_load = os.getloadavg()
    print(f"streamed fetch: {workers} decoding thread(s); in-memory path: its own pool "
          f"({min(32, (os.cpu_count() or 1) + 4)} threads)")
    print(f"load average (1, 5, 15 min): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start, "
          f"{end_load[0]:.1f} {end_load[1]:.1f} {end_load[2]:.1f} at the end; {os.cpu_count()} CPUs")
    small, big = _ends(rows, "streamed", sizes)
    if args.in_memory:
        old_small, old_big = _ends(rows, "in-memory", sizes)
        same = all(a["sha256"] == b["sha256"] for a in rows for b in rows if a["images"] == b["images"])
        print(f"in-memory path: peak memory {_k(sizes[-1])}/{_k(sizes[0])} "
              f"{old_big['vm_hwm_kb'] / old_small['vm_hwm_kb']:.2f} (RssAnon "
              f"{old_big['rss_anon_peak_kb'] / old_small['rss_anon_peak_kb']:.2f}); its images.npy is the "
              f"streamed fetch's, byte for byte: {same}")
    print(f"streamed: RssAnon peak {_k(sizes[-1])}/{_k(sizes[0])} "
          f"{big['rss_anon_peak_kb'] / small['rss_anon_peak_kb']:.2f}")
    line = (f"fetch: {big['images']} images, {big['images'] / big['seconds']:.0f} images/s, "
            f"peak memory {_k(sizes[-1])}/{_k(sizes[0])} {big['vm_hwm_kb'] / small['vm_hwm_kb']:.2f}")
    print(line)
    return line


def _configured_workers() -> int:
    """What `dvc repro` uses: data.num_workers of the image-folder config."""
    from pipeline.config import compose

    return int(compose(["data=imagefolder", "data.path=unused"]).data.num_workers)


def _ends(rows: list[dict], mode: str, sizes: list[int]) -> tuple[dict, dict]:
    """`mode`'s rows at the smallest and the largest size."""
    return tuple(next(r for r in rows if r["mode"] == mode and r["images"] == n) for n in (sizes[0], sizes[-1]))


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


if __name__ == "__main__":
    main()
