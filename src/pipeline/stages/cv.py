"""Stage: k-fold cross-validation of the configured model; writes metrics/cv.json."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tasks.cv import cross_validate


def main() -> int:
    return run_stage(cross_validate, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
