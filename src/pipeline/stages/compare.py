"""Stage: compare a grid of alternatives over the same folds; writes reports/compare.md."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tasks.compare import compare


def main() -> int:
    return run_stage(compare, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
