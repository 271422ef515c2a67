"""Connecting a process to Ray: a private local instance, or a cluster named by address;
and handing a driver's objects to the processes it starts there (`Shared`).

Sweeps (`driver.run_sweep`) and parallel cross-validation folds (`pipeline.tasks.cv`) both
start Ray here, so `tune.address` means the same for both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pipeline.tuning.stopping import keeps_sigterm_handler

# Trial actors are reused (`reuse_actors`): the next trial waits for the stopped trial's
# thread to unwind through Lightning, which can take longer than Tune's 2 s on a busy box.
TRIAL_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "60", "OMP_WAIT_POLICY": "PASSIVE"}


# MLflow's client credentials. Trials and parallel folds never talk to MLflow (the driver is
# the only writer), but under Ray Client (`ray://`) Tune runs the driver's trial loop, and
# so its MLflow callback, as a task on the head node, which does not inherit this process's
# environment. A job's env_vars can be read by whoever can reach the cluster (its dashboard,
# its GCS), so they go only where needed; Ray's token authentication guards both.
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def job_env(address: str) -> dict[str, str]:
    """The environment variables a job on the cluster at `address` gets: TRIAL_ENV, plus
    the MLflow credentials set here when Tune's loop runs on the cluster (`ray://`)."""
    env = dict(TRIAL_ENV)
    if address == "auto":  # ray.init resolves it through RAY_ADDRESS
        address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith("ray://"):
        env.update({key: os.environ[key] for key in MLFLOW_CREDENTIALS if os.environ.get(key)})
    return env


DRIVER_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/TensorBoard files; the JSON logger is added explicitly
    # The classic reporter: at verbose=1 just the trial status table, every few seconds (the
    # newer output, the default, also prints two boxes per trial).
    "RAY_AIR_NEW_OUTPUT": "0",
    # Keeping 2 checkpoints per trial forces an experiment snapshot per trial every 2 epochs; fine.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def init_ray(tune: Mapping[str, Any], *, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; True if this call did (the caller then shuts it down).

    `tune.address` (auto, host:port, ray://host:10001) joins that cluster. Null starts a
    private local Ray of `tune.num_cpus` CPUs (else `num_cpus`, else all), even when another
    Ray runs on this machine or RAY_ADDRESS names one. A Ray this process is already
    connected to (a test's, a caller's) is used as it is.
    """
    import ray

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    for key, value in TRIAL_ENV.items():
        os.environ.setdefault(key, value)
    if tune.get("address"):
        # Workers on other nodes do not inherit this process's environment.
        with keeps_sigterm_handler():
            ray.init(address=tune["address"], runtime_env={"env_vars": job_env(tune["address"])},
                     log_to_driver=True)
        return True
    if os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        print(f"note: tune.address is null, so this starts its own Ray and ignores RAY_ADDRESS="
              f"{os.environ['RAY_ADDRESS']} (tune.address=auto would join it).")
    # "local", not None: ray.init() joins RAY_ADDRESS or the last `ray start` on this machine,
    # whose CPUs, lifetime and jobs belong to someone else. A local Ray's workers inherit
    # TRIAL_ENV from the raylet this call starts; a runtime_env here would cost every sweep
    # about 1.5 s more before its first trial actor starts.
    with keeps_sigterm_handler():  # ray.init installs a SIGTERM handler of its own
        ray.init(address="local", num_cpus=tune.get("num_cpus") or num_cpus, include_dashboard=False)
    return True


class Shared:
    """An object put in Ray's object store once and passed on by reference.

    Pickling a `Shared` (into every trial's arguments, on to a trial's DDP ranks) carries
    only the reference; `get()` reads the object from the node's store, zero-copy for numpy
    arrays (which then are read-only). So each node holds one copy however many processes
    use it, and the driver's files need not be reachable from any of them. The driver keeps
    the object alive as long as it holds this.
    """

    def __init__(self, value: Any) -> None:
        import ray

        self.ref = ray.put(value)

    def get(self) -> Any:
        import ray

        return ray.get(self.ref)
