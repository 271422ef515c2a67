"""Stage 4: score the best checkpoint on test; confusion matrix and per-class figures."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tasks.evaluate import evaluate


def main() -> int:
    return run_stage(evaluate, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
