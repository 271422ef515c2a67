"""Where each stage reads and writes, derived from the (path-resolved) config in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig


@dataclass(frozen=True)
class Layout:
    root: Path
    raw: Path         # data/raw/<dataset>: canonical arrays + manifest (fetch)
    splits: Path      # data/splits/<dataset>: index files (split)
    downloads: Path   # original archives (torchvision datasets)
    models: Path      # checkpoints, run id, resolved config (train)
    metrics: Path     # train.json, test.json (dvc metrics)
    plots: Path       # per-epoch curves, confusion matrix, figures (dvc plots)
    root_out: Path    # paths.out_dir itself (cross-validation puts folds under it)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Layout:
        """`cfg` must have gone through `config.prepare` (absolute paths)."""
        data, out = Path(cfg.paths.data_dir), Path(cfg.paths.out_dir)
        return cls(root=Path(cfg.paths.root), raw=data / "raw" / cfg.data.name,
                   splits=data / "splits" / cfg.data.name, downloads=Path(cfg.paths.download_dir),
                   models=out / "models", metrics=out / "metrics", plots=out / "plots", root_out=out)

    @property
    def best_ckpt(self) -> Path:
        return self.models / "best.ckpt"

    @property
    def last_ckpt(self) -> Path:
        return self.models / "last.ckpt"

    @property
    def evolution(self) -> Path:
        """The weights kept after chosen epochs (report.evolution_epochs), `epoch_<n>.pt`."""
        return self.models / "evolution"

    @property
    def predictions(self) -> Path:
        """Test-set class probabilities written by evaluate (rows in test-split order)."""
        return self.metrics / "test_probs.npy"

    @property
    def run_file(self) -> Path:
        """The MLflow run the train stage opened; evaluate logs into the same run."""
        return self.models / "run.json"
