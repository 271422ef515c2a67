"""Lookahead (Zhang, Lucas, Hinton & Ba, 2019, "Lookahead Optimizer: k steps forward, 1 step back").

Any inner ("fast") optimizer takes k steps; then the slow weights move a fraction alpha of
the way toward the fast ones and the fast weights restart from there:

    phi <- phi + alpha * (theta - phi);   theta <- phi        (every k inner steps)

The slow weights phi start as the weights at the first step. The wrapper shares the inner
optimizer's `param_groups` (the same list of the same dicts), so learning-rate schedulers
built on the wrapper set the rate the inner optimizer uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer


class Lookahead(Optimizer):
    """`Lookahead(torch.optim.Adam(params, lr=1e-3), k=5, alpha=0.5)`.

    `state` holds only the slow weights (key "slow"); the inner optimizer's own state is in
    `base.state`. `state_dict()` holds both, with the step count, k and alpha:
    `{"base": base.state_dict(), "slow": {index: tensor}, "step": n, "k": k, "alpha": alpha}`,
    parameters numbered in `param_groups` order as torch numbers them.
    """

    def __init__(self, base: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"Lookahead wraps a torch optimizer, got {type(base).__name__}.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Lookahead k must be an integer >= 1, got {k!r}.")
        if not 0 < alpha <= 1:
            raise ValueError(f"Lookahead alpha must be in (0, 1], got {alpha!r}.")
        self.base = base
        self.k = k
        self.alpha = float(alpha)
        self.steps = 0  # inner steps taken
        # Optimizer.__init__ sets up hooks, step profiling and `state` (given an empty
        # group); then the inner optimizer's own group list becomes this one, shared.
        super().__init__([{"params": []}], dict(base.defaults))
        self.param_groups = base.param_groups

    def _params(self) -> list[torch.Tensor]:
        """Parameters in torch's state_dict numbering: group order, first occurrence."""
        seen: dict[int, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        with torch.no_grad():
            for p in self._params():
                if "slow" not in self.state[p]:
                    self.state[p]["slow"] = p.detach().clone()
        loss = self.base.step(closure) if closure is not None else self.base.step()
        self.steps += 1
        if self.steps % self.k == 0:
            with torch.no_grad():
                for p in self._params():
                    slow = self.state[p]["slow"]
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        params = self._params()
        slow = {i: self.state[p]["slow"] for i, p in enumerate(params) if "slow" in self.state.get(p, {})}
        return {"base": self.base.state_dict(), "slow": slow, "step": self.steps, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"base", "slow", "step"} - set(state_dict)
        if missing:
            raise ValueError(f"not a Lookahead state dict: it lacks {', '.join(sorted(missing))}.")
        self.base.load_state_dict(state_dict["base"])
        # torch's load_state_dict gives the inner optimizer a new group list: share it again.
        self.param_groups = self.base.param_groups
        params = self._params()
        self.state.clear()
        for i, tensor in state_dict["slow"].items():
            p = params[int(i)]
            self.state[p]["slow"] = tensor.detach().to(device=p.device, dtype=p.dtype).clone()
        self.steps = int(state_dict["step"])
        self.k = int(state_dict.get("k", self.k))
        self.alpha = float(state_dict.get("alpha", self.alpha))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Optimizer.__init__ adds the empty group here; afterwards groups go to the inner optimizer.
        if self.param_groups is self.base.param_groups:
            self.base.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:  # copy/pickle keep the inner optimizer and settings
        return {**super().__getstate__(), "base": self.base, "k": self.k, "alpha": self.alpha, "steps": self.steps}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, base={self.base!r})"
