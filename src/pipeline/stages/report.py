"""Stage 5: the "what the network learned" HTML report from the best checkpoint."""

import sys

from pipeline.stages._run import run_stage
from pipeline.tasks.report import report


def main() -> int:
    return run_stage(report, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
