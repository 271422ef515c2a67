"""Stage 1: write data/raw/<dataset>/ in the canonical format with a manifest."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tasks.prepare import fetch


def main() -> int:
    return run_stage(fetch, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
