"""Early stopping: end training when the optimised metric stops improving."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from pipeline.config import check_bool, check_number
from pipeline.training.regularizers.registry import Regularizer, register_regularizer

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback


@register_regularizer("early_stopping", default={"enabled": True, "patience": 10, "min_delta": 0.0})
class EarlyStopping(Regularizer):
    """Stops after `patience` epochs without an improvement of more than `min_delta`."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_bool(cfg, f"{key}.enabled")
        check_number(cfg, f"{key}.patience", integer=True, low=0)
        check_number(cfg, f"{key}.min_delta", low=0)

    @property
    def active(self) -> bool:
        return self.value["enabled"]

    def callbacks(self, *, monitor: str, mode: str) -> list[Callback]:
        # Imported here: Lightning takes seconds to import, and validating a config (the
        # tune driver, every `prepare`) builds this class without needing it.
        from lightning.pytorch.callbacks import EarlyStopping as Stop

        return [Stop(monitor=monitor, mode=mode, patience=self.value["patience"],
                     min_delta=self.value["min_delta"], check_finite=True)]
