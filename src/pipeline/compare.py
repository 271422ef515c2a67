"""`python -m pipeline.compare [hydra overrides]`: is design A really better than design B?

    python -m pipeline.compare 'compare.grid={model: [mlp, lenet5, minivgg, resnet20]}'
    python -m pipeline.compare 'compare.grid={model: [minivgg], regularizer: [none, dropout, batchnorm, augment]}'

Every alternative is cross-validated on the same folds and seed; reports/compare.md holds
the table, the pairwise tests and plain conclusions.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import config_dir
from pipeline.entry import run_adhoc


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from pipeline.tasks.compare import compare

    result = run_adhoc(cfg, compare)
    print("\n".join(result["statements"]))
    print(f"report: {cfg.paths.out_dir}/reports/compare.md")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
