"""`python -m pipeline.cv [hydra overrides]`: k-fold cross-validation of one configuration.

    python -m pipeline.cv model=lenet5 data.split.folds=5
    python -m pipeline.cv model=minivgg cv.parallel=true

Outputs go to Hydra's run folder: metrics/cv.json and one folder per fold under cv/.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import config_dir
from pipeline.entry import run_adhoc


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float:
    from pipeline.tasks.cv import cross_validate

    result = run_adhoc(cfg, cross_validate)
    for key in ("val_acc", "test_acc"):
        s = result[key]
        print(f"{key}: {s['mean']:.4f} ± {s['std']:.4f}  ({result['confidence']:.0%} CI {s['ci_low']:.4f}–{s['ci_high']:.4f})"
              f"  folds: {', '.join(f'{v:.4f}' for v in s['values'])}")
    print(f"outputs: {cfg.paths.out_dir}")
    return result["val_acc"]["mean"]


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
