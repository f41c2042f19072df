"""When the matrix sign (:mod:`.msign`) runs, and the alarm policy that gates it.

The alarm is a policy: a callable ``alarm(guard) -> bool`` on host values only, given to
``instrument(model, alarm=...)``. The default, :func:`quorum_alarm`, is the rule of
:mod:`.alarm`: a quorum of penalized layers that collapsed suddenly or deep, or an attention
pair far over its target. Benchmarks pass their own variants instead of patching the guard.

At each step the sign runs on the layers the last check flagged for collapse (``actuator=
"msign"``) and, at multiples of ``msign_every``, on the penalized layers of the schedule
(``msign_gate="always"``) or, when the alarm was raised since the last such step, on those
that looked randomly initialized. The learning-rate back-off (:mod:`.backoff`) is updated at
every step after the sign: by the fraction of layers treated for collapse (``lr_policy=
"graded"``) or by the alarm's sign (``"alarm"``).

What the guard changes in a run is logged (logger ``"spectral_guard"``): a WARNING at the
first intervention (the back-off or the alarm) and at the alarm's first sign (which half raised
the alarm, which layers, what was signed, the new lr scale, the settings that turn each off),
then an INFO line at each later change of the lr scale (by ``2 ** 0.25`` or more, or back to 1)
or of the set of layers an alarm signs.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

from . import sharded
from .alarm import collapse_depth, counts_toward_quorum
from .backoff import LRBackoff
from .config import GuardConfig
from .install import GuardedLayer
from .msign import msign_

Alarm = Callable[[Any], bool]
"""An alarm policy: ``alarm(guard) -> bool`` (host values only)."""

log = logging.getLogger("spectral_guard")
TURN_OFF = ("msign_every=0 turns the sign off, lr_backoff=1.0 the back-off "
            "(instrument(model, ...) or GuardConfig)")


def warn_if_blind(config: GuardConfig) -> None:
    """Warn when a layer is checked less often than ``alarm_fall_steps`` steps (the alarm's quorum
    counts only layers collapsed deep then, or none with ``alarm_depth=None``)."""
    if not config.sees_falls:
        counted = ("only layers collapsed alarm_depth="
                   f"{config.alarm_depth:g} below their floor count toward its quorum"
                   if config.alarm_depth is not None else
                   "only its attention half can raise it (alarm_depth=None)")
        warnings.warn(f"a layer is checked every {config.check_period} steps (every="
                      f"{config.every}, ratio={config.ratio}), more than alarm_fall_steps="
                      f"{config.alarm_fall_steps}: the alarm cannot see a sudden collapse, so "
                      f"{counted}; raise ratio or alarm_fall_steps (guard/alarm.py)", stacklevel=4)


def collapse_treated(layers: list[GuardedLayer], config: GuardConfig,
                     sudden: bool) -> tuple[list[GuardedLayer], int]:
    """The penalized layers treated for collapse (with ``sudden``, only those the alarm's
    quorum counts: fallen within ``alarm_fall_steps`` steps or ``alarm_depth`` deep,
    :func:`.alarm.counts_toward_quorum`), and how many layers are penalized."""
    penalized = [layer for layer in layers if layer.sensors]
    treated = [layer for layer in penalized
               if layer.state.treated and layer.state.lambdas["collapse"] > 0
               and (not sudden or counts_toward_quorum(
                   layer.state.collapse_fall, config.alarm_fall_steps,
                   collapse_depth(layer.state.readings, layer.sensors), config.alarm_depth))]
    return treated, len(penalized)


def quorum_alarm(guard: Any) -> bool:
    """The default alarm (``guard/alarm.py``): at least ``alarm_quorum`` of the penalized
    layers treated for collapse at once, each fallen within ``alarm_fall_steps`` steps or
    ``alarm_depth`` deep, or an
    attention pair's latest scale over ``alarm_attention_factor`` times its target."""
    config = guard.config
    if guard.attention is not None and guard.attention.alarm(config.alarm_attention_factor):
        return True
    collapsing, penalized = collapse_treated(guard.layers, config, sudden=True)
    return penalized > 0 and len(collapsing) >= config.alarm_quorum * penalized


def alarm_reason(guard: Any, alarm: Alarm) -> str:
    """Which half raised the alarm, in words (the pairs over the factor, or the layers of the
    quorum); a custom alarm policy is named."""
    config = guard.config
    if alarm is not quorum_alarm:
        return f"alarm policy {getattr(alarm, '__name__', repr(alarm))}"
    if guard.attention is not None and guard.attention.alarm(config.alarm_attention_factor):
        over = [f"{p.name} ({st.scale / st.target:.2f}x its target)"
                for p, st in zip(guard.attention.pairs, guard.attention.states, strict=True)
                if st.scale > config.alarm_attention_factor * st.target]
        return ("attention: logit scale over alarm_attention_factor="
                f"{config.alarm_attention_factor:g}x its target in {', '.join(over)}")
    collapsing, penalized = collapse_treated(guard.layers, config, sudden=True)
    return (f"collapse quorum: {len(collapsing)} of {penalized} penalized layers collapsed "
            f"suddenly or deep (alarm_fall_steps={config.alarm_fall_steps}, alarm_depth="
            f"{config.alarm_depth}, quorum {config.alarm_quorum:g}): "
            f"{', '.join(layer.name for layer in collapsing)}")


class MatrixSigns:
    """The sign's schedule, the latched alarm bit (part of the guard's state), the back-off's
    update and the log lines of both.

    ``raised``: the alarm at the last step it was read; ``alarm_signs``: steps where the alarm
    signed layers; ``reason``: why it was last raised (:func:`alarm_reason`)."""

    def __init__(self, config: GuardConfig, alarm: Alarm, backoff: LRBackoff) -> None:
        self.config = config
        self.alarm = alarm
        self.backoff = backoff
        self.alarm_seen = False
        self.raised = False
        self.alarm_signs = 0
        self.reason = ""
        self.announced = False            # the first intervention's WARNING was logged
        self.alarm_announced = False      # ... and the first alarm sign's
        self.logged_scale = backoff.scale
        self.logged_signs: tuple[str, ...] = ()

    def run(self, guard: Any, step: int, flagged: list[GuardedLayer]) -> None:
        """Sign the layers due at ``step`` (``flagged``: by the check just applied), then
        update the back-off."""
        every, gate = self.config.msign_every, self.config.msign_gate
        if every and gate == "alarm":
            self.raised = bool(self.alarm(guard))
            if self.raised and not self.alarm_seen:
                self.reason = alarm_reason(guard, self.alarm)
            self.alarm_seen = self.alarm_seen or self.raised   # latched between signs
        due, alarmed = list(flagged), []
        if every and step % every == 0 and (gate == "always" or self.alarm_seen):
            chosen = [layer for layer in guard.layers
                      if layer.penalized and (gate == "always" or layer.state.random_init)]
            if gate == "always":
                due += chosen   # a schedule, not an alarm: no back-off
            else:
                alarmed = chosen
            self.alarm_seen = False
        by_alarm, signed_by_alarm = {id(layer) for layer in alarmed}, []
        for layer in {id(layer): layer for layer in due + alarmed}.values():
            st = layer.state
            if st.nonfinite or sharded.is_sharded(layer.weight):
                st.msigns_skipped += 1   # FSDP2 shards: no full matrix here (docs/guard.md)
                continue
            msign_(layer.weight)
            st.msigns += 1
            if id(layer) in by_alarm:
                signed_by_alarm.append(layer.name)
        if signed_by_alarm:
            self.alarm_signs += 1
            self.backoff.on_alarm()   # "alarm" policy: the lr is too high (backoff.py)
        treated, penalized = collapse_treated(guard.layers, self.config,
                                              sudden=self.config.lr_count == "sudden")
        self.backoff.on_check(len(treated), penalized, self.config.alarm_quorum, step,
                              self.config.check_period)
        self.announce(step, signed_by_alarm, treated, penalized)

    def announce(self, step: int, signed: list[str], treated: list[GuardedLayer],
                 penalized: int) -> None:
        """The log lines of the module docstring (host values only)."""
        scale, before = self.backoff.scale, self.logged_scale
        moved = scale != before and (scale == 1.0 or abs(math.log2(scale / before)) >= 0.25)
        new_signs = bool(signed) and tuple(signed) != self.logged_signs
        if not (moved or new_signs):
            return
        parts = [f"step {step}"]
        if signed:
            parts.append(f"alarm ({self.reason}) signed {len(signed)} layers: "
                         f"{', '.join(signed)}")
        if moved:
            why = "alarm" if self.backoff.policy == "alarm" else (
                f"{len(treated)} of {penalized} penalized layers treated for collapse"
                + (" (fallen suddenly or deep)" if self.config.lr_count == "sudden" else "")
                + (f" ({', '.join(layer.name for layer in treated)})" if treated else "")
                + f", lr_grace={self.backoff.grace}")
            parts.append(f"lr scale {before:.3g} -> {scale:.3g} ({self.backoff.policy} "
                         f"back-off: {why})")
        if signed:
            self.logged_signs = tuple(signed)
        if moved:
            self.logged_scale = scale
        first_alarm = bool(signed) and not self.alarm_announced
        self.alarm_announced |= bool(signed)
        if not self.announced or first_alarm:
            self.announced = True
            log.warning("spectral_guard intervened: %s; %s", "; ".join(parts), TURN_OFF)
        else:
            log.info("spectral_guard: %s", "; ".join(parts))

    def state_dict(self) -> dict[str, Any]:
        return {"alarm_signs": self.alarm_signs, "raised": self.raised,
                "announced": self.announced, "alarm_announced": self.alarm_announced,
                "logged_scale": self.logged_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alarm_signs = int(state.get("alarm_signs", 0))
        self.raised = bool(state.get("raised", False))
        self.announced = bool(state.get("announced", False))
        self.alarm_announced = bool(state.get("alarm_announced", False))
        self.logged_scale = float(state.get("logged_scale", self.backoff.scale))


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
