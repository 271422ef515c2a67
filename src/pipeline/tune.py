"""`python -m pipeline.tune [tune=<space>] [hydra overrides]`: a Ray Tune sweep of the train
task, tracked in MLflow as one parent run with a child run per trial.

Outputs (trials.csv, curves, best.yaml) go to Hydra's run folder under results/tune/, never
over the DVC pipeline's; Ray's experiment folders go to tune.storage_path (results/ray/).

    python -m pipeline.tune                                     # conf/tune/lr_decay_dropout.yaml
    python -m pipeline.tune tune=architecture tune.num_samples=2
    python -m pipeline.tune tune=optimizer model=lenet5 tune.max_epochs=5
    python -m pipeline.tune tune.resume=true                    # continue an interrupted sweep
    python -m pipeline.tune tune.address=auto tune.storage_path=s3://bucket/ray   # on a cluster

Space keys contain dots, which Hydra's command line reads as nesting: add or change one with
`++tune.space.optimizer.lr="loguniform(1e-4,1e-1)"` (quoted), or replace the whole space with
`~tune.space '+tune.space={optimizer.lr: "uniform(0.001, 0.01)"}'`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import config_dir
from pipeline.entry import run_adhoc


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float:
    from pipeline.tuning.driver import run_sweep

    best = run_adhoc(cfg, run_sweep)
    print("best: " + "  ".join(f"{k}={v}" for k, v in best["overrides"].items()))
    where = f"mean of {best['folds']} folds" if "folds" in best else f"epoch {best['epoch']}"
    print(f"{best['metric']}={best['value']:.4f} (trial {best['trial_id']}, {where})")
    print(f"outputs: {cfg.paths.out_dir}/results/tune")
    return best["value"]


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
