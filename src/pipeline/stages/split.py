"""Stage 2: stratified train/val/test split and k folds, as index files."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tasks.prepare import split


def main() -> int:
    return run_stage(split, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
