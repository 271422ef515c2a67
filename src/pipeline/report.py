"""`python -m pipeline.report [run_id=<id>] [hydra overrides]`: the "what the network
learned" HTML report.

Without `run_id`, reports on the train/evaluate outputs under `paths.out_dir` (the DVC
pipeline's by default; `paths.out_dir=outputs/<date>/<time>` for an ad-hoc
`python -m pipeline.train` run) into `<out>/reports/report.html`. With `run_id`, reports on
that MLflow run (in `tracking.tracking_uri`) into this command's own Hydra run folder,
`outputs/<date>/<time>/reports/runs/<run_id>/report.html`.

    python -m pipeline.report
    python -m pipeline.report run_id=0123abcd... seed=7
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from pipeline.config import config_dir
from pipeline.errors import PipelineError


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from pipeline.config import prepare
    from pipeline.tasks.common import tracking_target
    from pipeline.tasks.report import report, report_for_run

    with open_dict(cfg):
        run_id = cfg.pop("run_id", None)
    try:
        if run_id:
            with open_dict(cfg):
                cfg.paths.out_dir = HydraConfig.get().runtime.output_dir
            uri = tracking_target(prepare(cfg))["tracking_uri"]
            path = report_for_run(str(run_id), uri, cfg)
        else:
            path = report(cfg)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print(f"report: {path}")


def _with_run_id_key(argv: list[str]) -> list[str]:
    """`run_id=X` -> `+run_id='X'`: the key is not in conf/ (it is no pipeline parameter), and
    quoted so that an id of digits and one `e` stays a string rather than a Hydra number."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "run_id":
            arg = f"+run_id={value}" if value[:1] in ("'", '"') or not value else f"+run_id='{value}'"
        out.append(arg)
    return out


def main() -> None:
    sys.argv[1:] = _with_run_id_key(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
