"""Stage 3 (before train): a Ray Tune sweep; results/tune/best.yaml feeds the train stage."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tuning.driver import run_sweep


def main() -> int:
    return run_stage(run_sweep, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
