"""Learning-rate back-off: the guard's answer to a learning rate that collapses layers together.

The matrix sign (:mod:`.msign`) restores the spectra of layers that collapsed together, and the
alarm stays raised while those layers stay treated (their ``lambda`` decays over several healthy
checks), so the sign repeats at every window through the high-LR phase (docs/efficacy.md: 100 to
150 steps in the benchmark, and no layer read collapsed again between signs). A learning rate
that collapses a quorum of layers is too high for this model; the back-off shrinks the step of
the optimizer the guard follows by a scale ``s``:

    s <- max(floor, factor * s)            at each step where the alarm signed layers
    lr_g -> s * lr_g                       for every param group, during ``optimizer.step()`` only

``lr_g`` is put back as soon as the step returns, so LR schedulers, the optimizer's
``state_dict`` and a user reading ``param_groups`` never see the scale; ``s`` never rises again
in a run (it is part of the guard's ``state_dict``). A tensor ``lr`` (capturable optimizers) is
scaled and restored in place, on its device, without a host read.

A step that raises (a NaN check, an out-of-memory error) never reaches the post-hook: the
scaled ``lr`` is put back at the next of the guard's touch points (:meth:`LRBackoff.recover`:
the next training forward, the next step's pre-hook, ``stats()``, ``state_dict()``,
``remove()``), keyed by the value the guard set (a value someone else set since is kept), so
the scale never compounds.

Example:
    >>> backoff = LRBackoff(factor=0.5, floor=0.25)
    >>> backoff.on_alarm(); backoff.scale
    0.5
"""

from __future__ import annotations

from typing import Any

import torch


class LRBackoff:
    """The scale ``s`` and its application around one optimizer step.

    Args:
        factor: multiplies ``s`` at each alarm (``1.0``: the back-off is off).
        floor: ``s`` never goes below it.
    """

    def __init__(self, factor: float, floor: float) -> None:
        self.factor = float(factor)
        self.floor = float(floor)
        self.scale = 1.0
        self.backoffs = 0
        self._saved: list[tuple[dict[str, Any], Any, Any]] = []   # group, original, set

    @property
    def enabled(self) -> bool:
        return self.factor < 1.0

    def on_alarm(self) -> None:
        """The alarm signed layers at this step: ``s <- max(floor, factor * s)`` (a back-off
        when it lowers ``s``; never with ``factor == 1``)."""
        scaled = max(self.floor, self.factor * self.scale)
        if scaled < self.scale:
            self.scale = scaled
            self.backoffs += 1

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale every param group's ``lr`` by ``s`` (nothing when ``s == 1``), after putting
        back what a step that raised left scaled."""
        self.recover()
        if self.scale == 1.0:
            return
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                self._saved.append((group, lr.detach().clone(), lr))
                lr.data.mul_(self.scale)
            elif isinstance(lr, (int, float)):
                scaled = lr * self.scale
                self._saved.append((group, lr, scaled))
                group["lr"] = scaled

    def recover(self) -> None:
        """Put back the ``lr`` values that :meth:`before_step` scaled and that still hold the
        value it set (after the step, or later when the step raised)."""
        saved, self._saved = self._saved, []
        for group, original, scaled in saved:
            now = group.get("lr")
            if isinstance(original, torch.Tensor):
                if now is scaled:
                    now.data.copy_(original)
            elif now is scaled or (type(now) is type(scaled) and now == scaled):
                group["lr"] = original

    after_step = recover

    @property
    def pending(self) -> bool:
        """An ``lr`` is scaled now (inside a step, or left by a step that raised)."""
        return bool(self._saved)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "backoffs": self.backoffs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state.get("scale", 1.0))
        self.backoffs = int(state.get("backoffs", 0))
