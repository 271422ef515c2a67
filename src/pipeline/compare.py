"""`python -m pipeline.compare [hydra overrides]`: is design A really better than design B?

    python -m pipeline.compare 'compare.grid={model: [mlp, lenet5, minivgg, resnet20]}'
    python -m pipeline.compare 'compare.grid={model: [minivgg], regularizer: [none, dropout, batchnorm, augment]}'

Every alternative is cross-validated on the same folds and seed; reports/compare.md holds
the table, the pairwise tests and plain conclusions.
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
    from pipeline.tasks.compare import compare
    from pipeline.tasks.prepare import ensure_data

    with open_dict(cfg):
        cfg.paths.out_dir = HydraConfig.get().runtime.output_dir
    try:
        ensure_data(cfg)
        result = compare(cfg)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print("\n".join(result["statements"]))
    print(f"report: {cfg.paths.out_dir}/reports/compare.md")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
