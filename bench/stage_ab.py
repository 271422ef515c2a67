"""Whole DVC stages, this tree's code against another revision's, alternating on one project.

Each round runs every named stage once with the baseline's `src/` and once with this tree's
(`python -m pipeline.cli.stages <stage>` in `--project`, with PYTHONPATH naming which `src/`),
and times each process from start to exit: imports, the work, and the exit itself. Running
the two sides back to back, round after round, is what makes the comparison fair on a shared
machine, whose speed drifts over minutes; the absolute times are only this hour's.

`--project` is a checkout where `dvc repro` has run (its data, best.yaml and model exist;
a clone with `.venv` linked to this one works). Stages whose inputs the other side's code
cannot read are not comparable; the default ones are.

    .venv/bin/python bench/stage_ab.py --project /tmp/w --baseline bca6434 --rounds 2
    .venv/bin/python bench/stage_ab.py --project /tmp/w --baseline bca6434 --stages cv compare --rounds 1

Last line: `stage_ab: <stages> baseline X s, this tree Y s (Z s less)`, sums of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("evaluate", "report", "train", "cv", "compare")  # the default: the costliest after tune
DATA_STAGES = ("fetch", "split")  # rewrite their (identical) outputs; tune's sweep is too noisy to time


def baseline_src(rev: str, into: Path) -> Path:
    """`src/` of revision `rev`, extracted under `into`."""
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run_stage(project: Path, stage: str, src: Path) -> tuple[float, int]:
    """Seconds from start to exit of the stage process with `src` first on the path, and its status."""
    env = {**os.environ, "PYTHONPATH": str(src), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.stages", stage], cwd=project, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return took, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, required=True, help="a checkout where `dvc repro` has run")
    parser.add_argument("--baseline", required=True, help="the revision to compare with (e.g. bca6434)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=DATA_STAGES + STAGES)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (args.project / "dvc.lock").is_file():
        print(f"error: {args.project} has no dvc.lock: run `dvc repro` there first.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="stage-ab-") as tmp:
        sides = {"baseline": baseline_src(args.baseline, Path(tmp)), "this tree": REPO / "src"}
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(1, args.rounds + 1):
            for stage in args.stages:
                for side, src in sides.items():
                    took, status = run_stage(args.project, stage, src)
                    if status != 0:
                        print(f"error: stage {stage} with the {side}'s code exited {status}", file=sys.stderr)
                        return 1
                    times.setdefault((stage, side), []).append(took)
                    print(f"round {r} {stage:8} {side:9} {took:6.1f} s", flush=True)
    medians = {key: statistics.median(values) for key, values in times.items()}
    for stage in args.stages:
        old, new = medians[(stage, "baseline")], medians[(stage, "this tree")]
        print(f"{stage:8} baseline {old:6.1f} s  this tree {new:6.1f} s  ({old - new:+.1f} s)")
    old = sum(medians[(s, "baseline")] for s in args.stages)
    new = sum(medians[(s, "this tree")] for s in args.stages)
    print(f"stage_ab: {' '.join(args.stages)} baseline {old:.1f} s, this tree {new:.1f} s ({old - new:.1f} s less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
