"""`pipeline`: every way in to the pipeline, as one command (also `python -m pipeline`).

    pipeline train|tune|cv|compare|report [hydra overrides]   the jobs (Hydra apps, see --help of each)
    pipeline models [--input 3x32x32] [--classes 10]           registered models with their size
    pipeline params                                            rewrite params.yaml from conf/
    pipeline deps [--check]                                    rewrite (check) dvc.yaml's code deps

`-v`/`--verbose` (anywhere, e.g. `pipeline -v cv`) shows everything the libraries print:
Lightning's header for every fit, MLflow's download bars and INFO lines, Ray's status table
every 10 s; PIPELINE_VERBOSE=1 does the same for `dvc repro`/`dvc exp run`.

Exit statuses are set in one place, `pipeline.cli.exits`: 0 success, 1 a bug, 2 a user error,
130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from pipeline.cli import exits
from pipeline.config import find_root
from pipeline.errors import ConfigError, PipelineError
from pipeline.quiet import VERBOSE_ENV, quiet

VERBOSE_FLAGS = ("-v", "--verbose")
STALE_LOCK = "dvc.lock no longer matches it: run `make lock` (dvc repro) and commit both."


def _models(args: argparse.Namespace) -> None:
    import torch

    from pipeline.models import count_macs, count_parameters, create_model, list_models

    c, h, w = (int(v) for v in args.input.lower().split("x"))
    print(f"{'model':<16}{'params':>14}{'MACs':>16}   input {c}x{h}x{w}, {args.classes} classes")
    for name in list_models():
        try:
            # On the meta device: shapes only, so even VGG-19's 140M weights cost nothing.
            with torch.device("meta"):
                model = create_model(name, in_channels=c, num_classes=args.classes, image_size=(h, w))
            macs = count_macs(model, (c, h, w))
            print(f"{name:<16}{count_parameters(model):>14,}{macs:>16,}")
        except PipelineError as err:
            print(f"{name:<16}{'-':>14}{'-':>16}   ({err})")


def _params(args: argparse.Namespace) -> None:
    # DVC's own function, so the file is byte-for-byte what `dvc exp run` writes.
    from dvc.utils.hydra import compose_and_dump

    from pipeline.config import CONFIG_NAME, config_dir

    out = find_root() / "params.yaml"
    before = out.read_text() if out.exists() else None
    compose_and_dump(out, str(config_dir()), None, CONFIG_NAME, str(find_root()), [])
    print(f"wrote {out}")
    if out.read_text() != before:
        print(STALE_LOCK)


def _deps(args: argparse.Namespace) -> None:
    from pipeline.cli.deps import check, write

    dvc_yaml = find_root() / "dvc.yaml"
    if args.check:
        problems = check(dvc_yaml)
        if problems:
            raise ConfigError("dvc.yaml's code deps differ from the stages' imports:\n  " + "\n  ".join(problems)
                              + "\nrun `make deps` (pipeline deps) to rewrite them.")
    elif write(dvc_yaml):
        print(f"wrote {dvc_yaml}")
        print(STALE_LOCK)


def _parser() -> argparse.ArgumentParser:
    from pipeline.cli.apps import JOBS

    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(*VERBOSE_FLAGS, action="store_true",
                        help="show everything the libraries print (sets PIPELINE_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for job, (_, summary) in JOBS.items():  # parsed by Hydra (see main); listed here for --help
        sub.add_parser(job, help=summary, add_help=False)
    models = sub.add_parser("models", help="list registered models with parameters and MACs")
    models.add_argument("--input", default="3x32x32", help="CxHxW input shape (default 3x32x32)")
    models.add_argument("--classes", type=int, default=10)
    models.set_defaults(func=_models)
    params = sub.add_parser("params", help="rewrite params.yaml from conf/ (as dvc exp run does)")
    params.set_defaults(func=_params)
    deps = sub.add_parser("deps", help="rewrite dvc.yaml's code deps from each stage's imports")
    deps.add_argument("--check", action="store_true", help="only check; exit 2 naming what differs")
    deps.set_defaults(func=_deps)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in VERBOSE_FLAGS for arg in argv):
        # In the environment, so Ray's workers and any process a job starts see it too.
        os.environ[VERBOSE_ENV] = "1"
        argv = [arg for arg in argv if arg not in VERBOSE_FLAGS]
    quiet()  # before the jobs' imports, some of which log as they load
    from pipeline.cli.apps import JOBS, launch

    if argv and argv[0] in JOBS:  # Hydra parses the rest (-m, --help, --cfg job, overrides)
        return launch(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    return exits.run(lambda: args.func(args))


def console() -> NoReturn:
    """The `pipeline` command (and `python -m pipeline`): `main` on the command line, then a
    quick exit (`exits.leave`)."""
    exits.leave(main())
