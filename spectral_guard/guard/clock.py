"""Which optimizer steps advance the guard's clock.

The optimizer given to ``guard.attach``, else any optimizer holding a guarded weight (cached
per optimizer until its param groups change). Two such optimizers step the clock twice per
training iteration: the guard warns once and suggests ``attach``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable

import torch


class Follower:
    """Decides whether an optimizer's step is one of the guard's steps.

    Args:
        weights: returns the guarded weight Parameters (read when an optimizer is new).
    """

    def __init__(self, weights: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._weights = weights
        self.attached: weakref.ref | None = None
        self._owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._ticked: weakref.WeakSet = weakref.WeakSet()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.attached = weakref.ref(optimizer)

    def follows(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.attached is not None:
            return self.attached() is optimizer
        key = (len(optimizer.param_groups), sum(len(g["params"]) for g in optimizer.param_groups))
        cached = self._owners.get(optimizer)
        if cached is None or cached[0] != key:
            ours = {id(w) for w in self._weights()}
            cached = (key, any(id(p) in ours for g in optimizer.param_groups
                               for p in g["params"]))
            self._owners[optimizer] = cached
        return cached[1]

    def tick(self, optimizer: torch.optim.Optimizer) -> None:
        """A followed optimizer stepped: warn (once) when it is the second one alive."""
        if self.attached is None and optimizer not in self._ticked:
            self._ticked.add(optimizer)
            if len(self._ticked) == 2:
                warnings.warn("two optimizers holding guarded weights step the guard: its "
                              "clock advances at each of their steps (twice per iteration); "
                              "call guard.attach(optimizer) to follow one", stacklevel=5)

    def __deepcopy__(self, memo: dict) -> Follower:
        """A copied guard follows nothing attached and has seen no optimizer."""
        return Follower(self._weights)
