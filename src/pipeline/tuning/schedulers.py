"""Trial schedulers that need more than Ray Tune's own options."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler


class FinalEpochPBT(PopulationBasedTraining):
    """PBT that never exploits on a trial's last report.

    A trial ends by itself after `max_t` epochs (its `train()` returns). Ray's PBT would still
    perturb it on that report when `max_t` falls on a perturbation interval, cloning another
    trial's (older) checkpoint and re-running epochs already done, so the trial would report
    its final epochs twice. The last score still counts for the other trials' quantiles.
    """

    def __init__(self, *, max_t: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_t = max_t

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        time = result.get(self._time_attr, 0)
        if time < self._max_t or self._metric not in result:
            return super().on_trial_result(tune_controller, trial, result)
        self._save_trial_state(self._trial_state[trial], time, result, trial)
        return TrialScheduler.CONTINUE
