"""The LightningModule: a registry network behind a preprocessing layer, trained with
cross-entropy plus the configured regularizers. Its hyperparameters (architecture name and
arguments, input statistics, optimizer, schedule, regularizers, init) are saved in every
checkpoint, so `Classifier.load_from_checkpoint` rebuilds it without the config.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from pipeline.data.batches import IGNORE_INDEX
from pipeline.models.transfer import param_groups

# Preprocess too: MLflow models logged before it moved to `network` name it here.
from pipeline.training.network import Preprocess, build_network  # noqa: F401
from pipeline.training.optim import build_optimizer
from pipeline.training.regularizers import Regularizers
from pipeline.training.schedules import build_scheduler

AUX_WEIGHT = 0.3  # GoogLeNet's auxiliary classifiers' share of the loss (Szegedy et al. 2014)


class Classifier(L.LightningModule):
    """Cross-entropy classifier; logs train/val loss and accuracy, each regularizer's loss
    term, and the learning rate, per epoch."""

    def __init__(self, *, arch: str, arch_kwargs: dict[str, Any], mean: list[float], std: list[float],
                 resize: int | None, optimizer: dict[str, Any], scheduler: dict[str, Any],
                 regularizer: dict[str, Any] | None = None, init: dict[str, Any] | None = None,
                 augment_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(arch, arch_kwargs, mean=mean, std=std, resize=resize, init=init)
        # The registry's entries act through the hooks below; a key the checkpoint's block
        # lacks (a regularizer added since) takes its default, which changes nothing.
        self.regularizers = Regularizers(regularizer, seed=augment_seed)
        self.criterion_kwargs = self.regularizers.criterion_kwargs()
        # Set by transfer learning (names of pretrained parameters, their lr ratio); not a
        # hyperparameter, so loading a checkpoint never re-fetches the pretrained source.
        self.pretrained: tuple[list[str], float] | None = None
        self._epoch_sums: dict[str, torch.Tensor] = {}  # see `_accumulate`
        self._epoch_count = 0
        self._eval_sums: torch.Tensor | None = None  # see `_eval_step`
        # trainer.channels_last (set by `builders.speed_up`): batches follow the weights into
        # NHWC order. Not a hyperparameter: the checkpoint's weights are the same either way.
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Transform (e.g. augment) training batches only, on the device the batch now lives on.
        if self.regularizers.acts("transform_batch") and self.trainer is not None and self.trainer.training:
            x, y = batch
            batch = self.regularizers.transform_batch(x), y
        if self.channels_last:
            x, y = batch
            batch = x.contiguous(memory_format=torch.channels_last), y
        return batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        ce = F.cross_entropy(logits, y, **self.criterion_kwargs)
        terms: dict[str, torch.Tensor] = {}
        aux = getattr(self.net[1], "aux_outputs", ())
        if aux:
            terms["aux"] = AUX_WEIGHT * sum(F.cross_entropy(a, y, **self.criterion_kwargs) for a in aux)
        terms.update(self.regularizers.loss_terms(self.net, logits, y))
        loss = ce + sum(terms.values()) if terms else ce
        acc = (logits.argmax(dim=1) == y).float().mean()
        values = {"train/loss": loss, "train/acc": acc}
        if terms:
            values["train/loss_ce"] = ce
            values.update({f"train/loss_{k}": v for k, v in terms.items()})
        self._accumulate(values, len(y))
        return loss

    # Evaluation metrics are the whole split's, on every rank: each rank sums loss, hits and
    # samples over its shard, leaving out the padding `TensorBatches` marks, and one all-reduce
    # at the epoch's end adds the ranks up. Early stopping, checkpointing, Ray Tune and MLflow
    # then see the same exact figures a single process would compute.
    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self(x)
        sums = torch.stack([F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX),
                            (logits.argmax(dim=1) == y).sum(), (y != IGNORE_INDEX).sum()]).float()
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums

    def _log_eval(self, split: str) -> None:
        if self._eval_sums is None:  # no batches on any rank (they all run as many)
            return
        loss, hits, count = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum").tolist()
        self._eval_sums = None
        if count:
            self.log(f"{split}/loss", loss / count, on_step=False, on_epoch=True, prog_bar=split == "val")
            self.log(f"{split}/acc", hits / count, on_step=False, on_epoch=True, prog_bar=split == "val")

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = None  # an interrupted evaluation must not leak into this one

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self._eval_sums = None

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # `self.log` costs about 0.3 ms a call on CPU (Lightning re-validates and moves its result
    # state every time), which was a twentieth of a small model's training step. So training
    # metrics are summed here, weighted by batch size exactly as Lightning's mean reduction
    # does (the same float32 operations, so the same values), and logged once per epoch under
    # the same keys, early enough for callbacks' `on_train_epoch_end` to read them.
    def _accumulate(self, values: dict[str, torch.Tensor], n: int) -> None:
        for key, value in values.items():
            weighted = value.detach() * n
            total = self._epoch_sums.get(key)
            self._epoch_sums[key] = weighted if total is None else total + weighted
        self._epoch_count += n

    def _log_epoch_sums(self) -> None:
        for key, total in self._epoch_sums.items():
            self.log(key, total / self._epoch_count, on_step=False, on_epoch=True, batch_size=1)
        self._epoch_sums, self._epoch_count = {}, 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The epoch's last batch: `done` covers the end of the data, limit_train_batches,
        # max_steps and a stop requested by a callback.
        if self.trainer.fit_loop.epoch_loop.done:
            self._log_epoch_sums()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_sums()  # for an epoch that ended any other way; else a no-op

    def on_train_epoch_start(self) -> None:
        self._epoch_sums, self._epoch_count = {}, 0
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)
        # The rate used during this epoch (schedulers step after it ends).
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.regularizers.before_optimizer_step(self.net, optimizer)  # e.g. decoupled weight decay

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = dict(self.hparams.optimizer)
        name = opt_cfg.pop("name")
        if self.pretrained is not None:
            names, ratio = self.pretrained
            params: Any = param_groups(self.net[1], names, lr=opt_cfg["lr"], ratio=ratio)
        else:
            params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, name, **opt_cfg)
        sched_cfg = dict(self.hparams.scheduler)
        # Per-step schedules (one-cycle) need the run length in optimizer steps. Rounding the
        # per-epoch count up keeps epochs * steps_per_epoch >= the steps actually taken.
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        total = self.trainer.estimated_stepping_batches
        steps_per_epoch = max(1, -(-int(total) // epochs)) if total != float("inf") else 1
        lr_scheduler = build_scheduler(optimizer, sched_cfg.pop("name"), max_epochs=epochs,
                                       steps_per_epoch=steps_per_epoch, **sched_cfg)
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
