"""`pipeline` console command: small utilities around the pipeline.

    pipeline models [--input 3x32x32] [--classes 10]   list registered models with size
    pipeline params                                    rewrite params.yaml from conf/
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import PipelineError


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

    from pipeline.config import CONFIG_NAME, config_dir, find_root

    out = find_root() / "params.yaml"
    compose_and_dump(out, str(config_dir()), None, CONFIG_NAME, str(find_root()), [])
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list registered models with parameters and MACs")
    models.add_argument("--input", default="3x32x32", help="CxHxW input shape (default 3x32x32)")
    models.add_argument("--classes", type=int, default=10)
    models.set_defaults(func=_models)
    params = sub.add_parser("params", help="rewrite params.yaml from conf/ (as dvc exp run does)")
    params.set_defaults(func=_params)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
