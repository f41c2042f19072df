"""Learning-rate back-off: the guard's answer to a learning rate that collapses layers.

The optimizer step the guard follows is scaled by ``s`` (``lr_g -> s * lr_g`` for every param
group, during ``optimizer.step()`` only). Two policies set ``s`` (``GuardConfig.lr_policy``):

``"graded"`` (the default): at every applied check, with ``f`` the fraction of penalized
layers collapsing now, not counting the first ``lr_grace`` of them (``lr_count="sudden"``, the
default: the layers the alarm's quorum counts, fallen suddenly or collapsed deep;
``"treated"``: every layer treated for collapse), and ``q`` the alarm's quorum
(``alarm_quorum``)::

    s* = max(floor, factor ** (f / q))       target (factor = lr_backoff = 0.5: s* = 2^(-f/q))
    s  <- s*                                  when s* < s (down at once)
    s  <- min(s*, s * 2 ** (dp / recovery))   otherwise (dp: check periods since the last
                                              update, recovery = lr_recovery)

so ``s`` doubles back at most once per ``lr_recovery`` (25) healthy check periods of a layer
(``every * ceil(1 / ratio)`` steps) and returns to 1 once no layer (beyond the grace) is
treated: a transient instability costs a transient back-off. At ``f = q`` (the alarm's quorum)
``s* = factor``, one step of the old policy; at a step where the alarm signs layers (either
half: the attention half raises it with no layer collapsed) ``f`` counts as at least ``q``.
A healthy run (``f = 0``, no alarm) is never touched. bench/band_probe.py measured it against
the old policy (docs/efficacy.md). The alarm still gates the matrix sign (:mod:`.signs`).

``"alarm"`` (the policy before issue 18): ``s <- max(floor, factor * s)`` at each step where
the alarm signed layers; ``s`` never rises again in a run.

``lr_g`` is put back as soon as the step returns, so LR schedulers, the optimizer's
``state_dict`` and a user reading ``param_groups`` never see the scale (``s`` is part of the
guard's ``state_dict``). A tensor ``lr`` (capturable optimizers) is scaled and restored in
place, on its device, without a host read.

A step that raises (a NaN check, an out-of-memory error) never reaches the post-hook: the
scaled ``lr`` is put back at the next of the guard's touch points (:meth:`LRBackoff.recover`:
the next training forward, the next step's pre-hook, ``stats()``, ``state_dict()``,
``remove()``), keyed by the value the guard set (a value someone else set since is kept), so
the scale never compounds.

Example:
    >>> graded_scale(0.25, quorum=0.15, floor=0.25, scale=1.0, periods=1.0)   # drop at once
    0.3149802624737183
    >>> graded_scale(0.0, quorum=0.15, floor=0.25, scale=0.25, periods=25.0)  # doubling back
    0.5
    >>> backoff = LRBackoff(factor=0.5, floor=0.25)       # the "alarm" policy
    >>> backoff.on_alarm(); backoff.scale
    0.5
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Policy = Literal["graded", "alarm"]
POLICIES = ("graded", "alarm")


def graded_target(fraction: float, quorum: float, floor: float, factor: float = 0.5) -> float:
    """``max(floor, factor ** (fraction / quorum))``: the scale the fraction of layers treated
    for collapse calls for (``factor`` at the alarm's quorum; 1 when none is)."""
    if fraction <= 0.0 or factor >= 1.0:
        return 1.0
    return max(floor, factor ** (fraction / quorum))


def graded_scale(fraction: float, quorum: float, floor: float, scale: float, periods: float,
                 recovery: float = 25.0, factor: float = 0.5) -> float:
    """The graded law (module docstring; pure): down to the target at once, up toward it by
    at most ``2 ** (periods / recovery)`` (``periods``: check periods since the last update;
    ``recovery == 0``: never up)."""
    target = graded_target(fraction, quorum, floor, factor)
    if target <= scale:
        return target
    if recovery <= 0:
        return scale
    return min(target, scale * 2.0 ** (periods / recovery))


class LRBackoff:
    """The scale ``s`` and its application around one optimizer step.

    Args:
        factor: ``"alarm"``: multiplies ``s`` at each alarm; ``"graded"``: the target at the
            quorum (``1.0``: the back-off is off).
        floor: ``s`` never goes below it.
        policy: ``"alarm"`` or ``"graded"`` (module docstring).
        recovery: ``"graded"``: check periods per doubling back (``0``: never rises).
        grace: ``"graded"``: treated layers not counted in ``f``.
    """

    def __init__(self, factor: float, floor: float, policy: Policy = "alarm",
                 recovery: float = 25.0, grace: int = 0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"lr_policy must be 'graded' or 'alarm', got {policy!r}")
        self.factor = float(factor)
        self.floor = float(floor)
        self.policy = policy
        self.recovery = float(recovery)
        self.grace = int(grace)
        self.scale = 1.0
        self.backoffs = 0
        self.updated_step: int | None = None   # "graded": the step of the last update
        self._alarmed = False                  # "graded": the alarm signed at this step
        self._saved: list[tuple[dict[str, Any], Any, Any]] = []   # group, original, set

    @property
    def enabled(self) -> bool:
        return self.factor < 1.0

    def on_alarm(self) -> None:
        """The alarm signed layers at this step (``"alarm"`` policy): ``s <- max(floor,
        factor * s)`` (a back-off when it lowers ``s``; never with ``factor == 1``);
        ``"graded"``: the next :meth:`on_check` counts ``f`` as at least the quorum."""
        if self.policy != "alarm":
            self._alarmed = True
            return
        scaled = max(self.floor, self.factor * self.scale)
        if scaled < self.scale:
            self.scale = scaled
            self.backoffs += 1

    def on_check(self, treated: int, penalized: int, quorum: float, step: int,
                 check_period: int) -> None:
        """One update of the ``"graded"`` policy at ``step`` (``treated``: the penalized layers
        collapsing now as ``lr_count`` counts them, of ``penalized``); nothing under
        ``"alarm"`` or when off."""
        if self.policy != "graded" or not self.enabled:
            return
        last, self.updated_step = self.updated_step, step
        periods = 0.0 if last is None else max(step - last, 0) / max(check_period, 1)
        fraction = max(treated - self.grace, 0) / penalized if penalized else 0.0
        if self._alarmed:
            fraction, self._alarmed = max(fraction, quorum), False
        scaled = graded_scale(fraction, quorum, self.floor, self.scale, periods,
                              self.recovery, self.factor)
        if scaled < self.scale:
            self.backoffs += 1
        self.scale = scaled

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
        return {"scale": self.scale, "backoffs": self.backoffs,
                "updated_step": self.updated_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also a state saved before the graded policy (no ``updated_step``)."""
        self.scale = float(state.get("scale", 1.0))
        self.backoffs = int(state.get("backoffs", 0))
        step = state.get("updated_step")
        self.updated_step = None if step is None else int(step)
