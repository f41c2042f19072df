"""When the matrix sign (:mod:`.msign`) runs, and the alarm policy that gates it.

The alarm is a policy: a callable ``alarm(guard) -> bool`` on host values only, given to
``instrument(model, alarm=...)``. The default, :func:`quorum_alarm`, is the rule of
:mod:`.alarm`: a quorum of penalized layers that collapsed suddenly, or an attention pair far
over its target. Benchmarks pass their own variants instead of patching the guard.

At each step the sign runs on the layers the last check flagged for collapse (``actuator=
"msign"``) and, at multiples of ``msign_every``, on the penalized layers of the schedule
(``msign_gate="always"``) or, when the alarm was raised since the last such step, on those
that looked randomly initialized; a sign by the alarm backs the learning rate off
(:mod:`.backoff`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from . import sharded
from .alarm import fell_suddenly
from .backoff import LRBackoff
from .config import GuardConfig
from .install import GuardedLayer
from .msign import msign_

Alarm = Callable[[Any], bool]
"""An alarm policy: ``alarm(guard) -> bool`` (host values only)."""


def warn_if_blind(config: GuardConfig) -> None:
    """Warn when a layer is checked less often than ``msign_fall`` steps (the alarm's quorum
    half could never fire)."""
    if not config.sees_falls:
        warnings.warn(f"a layer is checked every {config.check_period} steps (every="
                      f"{config.every}, ratio={config.ratio}), more than msign_fall="
                      f"{config.msign_fall}: the alarm cannot see a sudden collapse, so "
                      "only its attention half can raise it; raise ratio or msign_fall "
                      "(guard/alarm.py)", stacklevel=4)


def collapse_treated(layers: list[GuardedLayer], config: GuardConfig,
                     sudden: bool) -> tuple[list[GuardedLayer], int]:
    """The penalized layers treated for collapse (only those fallen within ``msign_fall``
    steps with ``sudden``), and how many layers are penalized."""
    penalized = [layer for layer in layers if layer.sensors]
    treated = [layer for layer in penalized
               if layer.state.treated and layer.state.lambdas["collapse"] > 0
               and (not sudden or fell_suddenly(layer.state.collapse_fall, config.msign_fall))]
    return treated, len(penalized)


def quorum_alarm(guard: Any) -> bool:
    """The default alarm (``guard/alarm.py``): at least ``msign_quorum`` of the penalized
    layers treated for collapse at once, each fallen within ``msign_fall`` steps, or an
    attention pair's latest scale over ``msign_alarm`` times its target."""
    config = guard.config
    if guard.attention is not None and guard.attention.alarm(config.msign_alarm):
        return True
    collapsing, penalized = collapse_treated(guard.layers, config, sudden=True)
    return penalized > 0 and len(collapsing) >= config.msign_quorum * penalized


class MatrixSigns:
    """The sign's schedule and the latched alarm bit (part of the guard's state)."""

    def __init__(self, config: GuardConfig, alarm: Alarm, backoff: LRBackoff) -> None:
        self.config = config
        self.alarm = alarm
        self.backoff = backoff
        self.alarm_seen = False

    def run(self, guard: Any, step: int, flagged: list[GuardedLayer]) -> None:
        """Sign the layers due at ``step`` (``flagged``: by the check just applied)."""
        every, gate = self.config.msign_every, self.config.msign_gate
        if every and gate == "alarm":
            self.alarm_seen = self.alarm_seen or self.alarm(guard)   # latched between signs
        due, alarmed = list(flagged), []
        if every and step % every == 0 and (gate == "always" or self.alarm_seen):
            chosen = [layer for layer in guard.layers
                      if layer.penalized and (gate == "always" or layer.state.random_init)]
            if gate == "always":
                due += chosen   # a schedule, not an alarm: no back-off
            else:
                alarmed = chosen
            self.alarm_seen = False
        by_alarm, signed_by_alarm = {id(layer) for layer in alarmed}, False
        for layer in {id(layer): layer for layer in due + alarmed}.values():
            st = layer.state
            if st.nonfinite or sharded.is_sharded(layer.weight):
                st.msigns_skipped += 1   # FSDP2 shards: no full matrix here (docs/guard.md)
                continue
            msign_(layer.weight)
            st.msigns += 1
            signed_by_alarm |= id(layer) in by_alarm
        if signed_by_alarm:
            self.backoff.on_alarm()   # the alarm signed: the lr is too high (backoff.py)


class SignStep:
    """The matrix sign as a step of the check cycle (:meth:`.protocol.AsyncChecks.advance`):
    after the layer checks are applied, before the attention readings are (the alarm reads the
    attention scales of the previous step); it launches nothing."""

    name = "signs"

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    def apply(self, result: Any, step: int) -> None:
        g = self.guard
        flagged, g.cycle.collapse_flagged = g.cycle.collapse_flagged, []
        g.signs.run(g, g.global_step, flagged)

    def launch(self, step: int, packer: Any) -> None:
        return None
