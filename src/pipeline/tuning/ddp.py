"""A Tune trial trained by Ray Train's TorchTrainer with Lightning DDP (`tune.workers > 1`).

Ray Train V2 runs inside a Tune trial as a plain function trainable that builds and fits a
TorchTrainer. Here the trial (which holds no CPU itself) starts the Train run in a thread and
relays each epoch back to Tune:

    workers (every rank)                      Train controller          Tune trial
    WorkerReporter: metrics averaged over ranks,
    rank 0 saves the Lightning checkpoint,
    ray.train.report(metrics, checkpoint) --> Relay.after_report --> queue --> tune.report(...)
    rank 0 waits for the trial's answer  <------------------------------------ "go" / "stop"
    and broadcasts it, so all ranks stop together (ASHA, PBT, divergence).

Every worker calls the train task with the same config (tracking off), the sweep's data
(from Ray's object store: `ray_init.Shared`) and `trainer_kwargs` for the DDP strategy;
`ArrayDataModule` shards batches by rank itself, padded so that every rank runs as many
batches (DDP's collectives wait for all of them).
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from pipeline.training.metrics import EPOCH_METRICS
from pipeline.tuning.ray_init import Shared
from pipeline.tuning.reporter import rescale_lr, tune_iteration
from pipeline.tuning.trial import CKPT_FILE, META_FILE, TrainFn

ANSWER_TIMEOUT_S = 3600.0  # rank 0 waits this long for the trial to take an epoch's report
POLL_S = 0.5


class WorkerReporter(Callback):
    """On every Ray Train worker: each epoch's metrics (averaged over ranks) and rank 0's
    checkpoint go to `ray.train.report`; then all ranks follow the Tune trial's decision."""

    def __init__(self, answers: Any, *, lr: float = 0.0, lr_scale: float = 1.0) -> None:
        self.answers, self.lr, self.lr_scale = answers, lr, lr_scale
        self._batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.lr_scale != 1.0:
            rescale_lr(trainer, self.lr_scale)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import ray
        import torch
        from ray import train

        logged = trainer.callback_metrics
        strategy = trainer.strategy
        # val/* are already the whole split's (the module all-reduces them); train/* cover each
        # rank's shard, all of one size, so their mean over ranks is the padded epoch's figure.
        metrics: dict[str, Any] = {}
        for key in EPOCH_METRICS:
            if key in logged:
                value = torch.as_tensor(float(logged[key]), dtype=torch.float64, device=strategy.root_device)
                metrics[key] = float(strategy.reduce(value, reduce_op="mean"))
        metrics.update(tune_iteration(trainer.current_epoch))
        diverged = not all(math.isfinite(metrics.get(k, 0.0)) for k in ("train/loss", "val/loss"))
        metrics["diverged"] = int(diverged)
        metrics.update(rank=trainer.global_rank, world_size=trainer.world_size, train_batches=self._batches,
                       node_id=ray.get_runtime_context().get_node_id(),
                       gpu_ids=",".join(str(g) for g in ray.get_gpu_ids()))
        if diverged:
            metrics["val/acc"] = math.nan
        rank0 = trainer.global_rank == 0
        with tempfile.TemporaryDirectory(prefix="ddp-ckpt-") as folder:
            checkpoint = None
            if not diverged:
                trainer.save_checkpoint(Path(folder) / CKPT_FILE)  # collective; rank 0 writes
                if rank0:
                    (Path(folder) / META_FILE).write_text(json.dumps({"lr": self.lr, "epoch": trainer.current_epoch}))
                    checkpoint = train.Checkpoint.from_directory(folder)
            train.report(metrics, checkpoint=checkpoint)
        stop = diverged
        if rank0 and not diverged:
            stop = self.answers.get(timeout=ANSWER_TIMEOUT_S) != "go"
        if strategy.broadcast(stop, src=0):
            trainer.should_stop = True


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: the trial's config, trained with Lightning DDP."""
    import torch
    from omegaconf import OmegaConf
    from ray import train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    train_task = config["train"]
    torch.set_num_threads(max(1, int(config["cpus"])))
    plain = json.loads(json.dumps(config["plain"]))
    rank = train.get_context().get_world_rank()
    if rank:  # only rank 0 writes the trial's outputs
        plain["paths"]["out_dir"] = str(Path(plain["paths"]["out_dir"]) / "ranks" / f"rank{rank}")
    cfg = OmegaConf.create(plain)
    reporter = WorkerReporter(config["answers"], lr=config["lr"], lr_scale=config["lr_scale"])
    kwargs = {"strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()], "devices": "auto",
              "accelerator": config["accelerator"]}
    callbacks = [reporter, *config["callbacks"]]
    data = config["data"].get() if config["data"] is not None else None
    checkpoint = config["checkpoint"]
    if checkpoint is None:
        train_task(cfg, callbacks=callbacks, trainer_kwargs=kwargs, figures=False, data=data)
        return
    with checkpoint.as_directory() as folder:
        train_task(cfg, callbacks=callbacks, trainer_kwargs=kwargs, ckpt_path=str(Path(folder) / CKPT_FILE),
                   figures=False, data=data)


def _relay_callback(queue: Any) -> Any:
    from ray.train.v2.api.callback import UserCallback

    class Relay(UserCallback):
        """In the Train controller: every epoch's reports (one per rank) to the Tune trial."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put((metrics, checkpoint))

    return Relay()


def run_ddp(plain: dict[str, Any], train_task: TrainFn, *, workers: int, cpu: float, gpu: float,
            storage: str | None, lr: float, lr_scale: float, checkpoint: Any,
            callbacks: Sequence[Callback], data: Shared | None = None) -> None:
    """Fit a TorchTrainer of `workers` ranks for this Tune trial and report its epochs to Tune
    as a single-worker trial would (rank 0's checkpoint; metrics averaged over ranks). Every
    rank trains on `data` (train's `data=`) if given."""
    from ray import train, tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    reports, answers = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    use_gpu = gpu > 0
    resources = {"CPU": cpu, **({"GPU": gpu} if use_gpu else {})}
    context = tune.get_context()
    trial_folder = Path(context.get_trial_dir()).name
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"plain": plain, "train": train_task, "cpus": cpu, "lr": lr, "lr_scale": lr_scale,
                           "checkpoint": checkpoint, "callbacks": list(callbacks), "answers": answers, "data": data,
                           "accelerator": "gpu" if use_gpu else "cpu"},
        scaling_config=train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=train.RunConfig(
            name="ray-train", storage_path=f"{storage.rstrip('/')}/{trial_folder}" if storage else None,
            callbacks=[_relay_callback(reports)], failure_config=train.FailureConfig(max_failures=0),
            checkpoint_config=train.CheckpointConfig(num_to_keep=1)))

    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # raised in the trial's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ddp-fit", daemon=True)
    thread.start()
    answered = False
    try:
        while True:
            try:
                per_rank, persisted = reports.get(timeout=POLL_S)
            except Empty:
                if not thread.is_alive():
                    break
                continue
            metrics = dict(per_rank[0])
            metrics["ranks"] = json.dumps([{k: r[k] for k in ("rank", "world_size", "train_batches")}
                                           for r in per_rank])
            answered = False
            if persisted is None:  # diverged: no checkpoint, the workers stop by themselves
                tune.report(metrics)
                continue
            with persisted.as_directory() as folder:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            answers.put("go")
            answered = True
    finally:
        if not answered and thread.is_alive():
            answers.put("stop")  # Tune stopped the trial mid-report: let the workers wind down
        thread.join(timeout=120)
        for q in (reports, answers):
            q.shutdown()
    if "error" in outcome:
        raise outcome["error"]
