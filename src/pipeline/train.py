"""`python -m pipeline.train [hydra overrides]`: compose conf/, then fetch/split if needed,
train and evaluate, all through the same task functions as the DVC stages.

Outputs go to Hydra's run folder (outputs/<date>/<time>/), never over the DVC pipeline's.

    python -m pipeline.train model=lenet5 optimizer.lr=0.01
    python -m pipeline.train experiment=lenet5_digits trainer.max_epochs=5
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import config_dir
from pipeline.entry import run_adhoc


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float:
    from pipeline.tasks.evaluate import evaluate
    from pipeline.tasks.train import train

    metrics = run_adhoc(cfg, lambda c: {**train(c), **evaluate(c)})
    shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/")) and not k.endswith("/n")}
    print("  ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
    print(f"outputs: {cfg.paths.out_dir}")
    return metrics[cfg.optimized_metric]


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
