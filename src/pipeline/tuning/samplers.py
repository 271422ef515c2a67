"""Optuna samplers as a sweep's driver can keep them.

Ray Tune pickles the search algorithm, sampler included, when the Tuner is made (tuner.pkl,
for `Tuner.restore`) and in every experiment checkpoint (`OptunaSearch.save`, with plain
pickle). Optuna 5.1's genetic-algorithm samplers hold a `threading.Lock`, which pickle refuses:
`tune.search_alg=nsga2` failed before its first trial ("cannot pickle '_thread.lock'
object"). Imported only where a sweep uses Optuna.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna

_LOCK = "_thread_lock"  # optuna.samplers._ga.BaseGASampler's, since Optuna 5.1


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable: the lock (it guards the generation cache against
    the study's threads) is left out and a new one made on unpickling."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if _LOCK in state:
            state[_LOCK] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if _LOCK in state:
            setattr(self, _LOCK, threading.Lock())
