"""What each stage pays in imports before its first useful step, and whether it loads Lightning.

For every way in (a DVC stage's task module, the model listing, config validation) a fresh
interpreter imports what that entry runs before its first step (the stage runner's
validation of params.yaml, then its task's imports) and reports the CPU time and wall time this took and
whether `lightning` ended up in `sys.modules`. Each entry runs `--repeats` times, alternating
entries, and the median is kept. The CPU time
(`time.process_time`, the import is single-threaded) is the figure to compare on a shared
machine: the wall time there mostly measures the other jobs.

    .venv/bin/python bench/startup.py [--repeats 5]
    PYTHONPATH=<other>/src .venv/bin/python bench/startup.py --params <other>/params.yaml  # another tree

Last line: `startup: evaluate X.XX CPU s, lightning loaded by N of M non-training entries`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# The stage runner validates params.yaml (`prepare`, building no optimizer in the stages
# that never train) before it imports its task. (A tree older than NOT_TRAINING: plain prepare.)
STAGE = ("import importlib; import pipeline.cli.stages as s; from pipeline.config import load_params; "
         "from pipeline.validation import prepare; cfg = load_params(PARAMS); "
         "prepare(cfg, trains={0!r} not in s.NOT_TRAINING) if hasattr(s, 'NOT_TRAINING') else prepare(cfg); "
         "importlib.import_module(s.STAGES[{0!r}].partition(':')[0])")
# entry -> (what it runs before its first step, whether it trains)
ENTRIES: dict[str, tuple[str, bool]] = {
    "config validation": ("from pipeline.config import load_params; from pipeline.validation import prepare; "
                          "prepare(load_params(PARAMS))", False),
    "pipeline models": ("from pipeline.cli.main import _models; import pipeline.models; import torch", False),
    "stage fetch, split": (STAGE.format("fetch"), False),
    "stage evaluate": (STAGE.format("evaluate"), False),
    "stage report": (STAGE.format("report"), False),
    "stage train": (STAGE.format("train"), True),
    "stage cv": (STAGE.format("cv"), True),
    "stage tune": (STAGE.format("tune"), True),
}
CHILD = """
import sys, time, json
PARAMS = {params!r}
t, c = time.perf_counter(), time.process_time()
{code}
took, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({{"s": took, "cpu": cpu, "lightning": "lightning" in sys.modules}}))
"""
PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")


def measure(code: str, params: str = PARAMS) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(params=params, code=code)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--params", default=PARAMS, help="the params.yaml validated (default: this checkout's)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in ENTRIES}
    cpus: dict[str, list[float]] = {name: [] for name in ENTRIES}
    loads: dict[str, bool] = {}
    for _ in range(args.repeats):
        for name, (code, _) in ENTRIES.items():
            result = measure(code, args.params)
            times[name].append(result["s"])
            cpus[name].append(result["cpu"])
            loads[name] = result["lightning"]
    print(f"{'entry':<22}{'CPU s median':>13}{'min':>7}{'max':>7}{'wall s median':>15}  lightning")
    for name in ENTRIES:
        t, c = times[name], cpus[name]
        print(f"{name:<22}{statistics.median(c):>13.2f}{min(c):>7.2f}{max(c):>7.2f}{statistics.median(t):>15.2f}  "
              f"{'yes' if loads[name] else 'no'}")
    idle = [n for n, (_, trains) in ENTRIES.items() if not trains]
    print(f"startup: evaluate {statistics.median(cpus['stage evaluate']):.2f} CPU s, lightning loaded by "
          f"{sum(loads[n] for n in idle)} of {len(idle)} non-training entries")


if __name__ == "__main__":
    main()
