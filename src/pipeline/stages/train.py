"""Stage 3: train on train, validate on val, checkpoint the best by val/acc."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tasks.train import train


def main() -> int:
    return run_stage(train, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
