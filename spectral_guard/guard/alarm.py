"""The guard's alarm: the signature of a learning rate too high for the model.

The alarm gates the matrix sign (:mod:`.msign`) and the learning-rate back-off
(:mod:`.backoff`). It is raised at a step when either

* **a quorum of layers collapsed suddenly or deep**: at least ``alarm_quorum`` of the penalized
  layers are treated for collapse, and each of them either

  - *fell*: at some check of that treatment it had lost at least :data:`FALL_DEPTH` of
    effective-rank retention within the last ``alarm_fall_steps`` optimizer steps (the steps since
    its latest reading at least ``FALL_DEPTH`` above that check's; the baseline reads 1), or
  - *is deep*: its latest relative collapse reading ``x`` (effective-rank or stable-rank
    retention) is at least ``alarm_depth`` below that sensor's floor ``t`` as the thermostat's
    severity, ``1 - x / t >= alarm_depth`` (:func:`collapse_depth`); or

* an attention pair's latest scale is over ``alarm_attention_factor`` times its target.

The law's two ways of counting a layer: the fall is a time, in optimizer steps, so it sees a
collapse only where a layer is checked more often than ``alarm_fall_steps`` steps and judges it by
how fast it came; the depth counts no time, so it reads the same at any run length, check
period or schedule, and sees only collapses far below the floor. Healthy training lowers the
effective rank of some layers too (the query and key projections first), slowly and, over long
runs, a little below the floor; a learning rate too high drives many layers down fast, and far.
What each count caught and missed, on which models, runs and check periods: docs/efficacy.md
(issue 18). ``alarm_fall_steps=0`` or ``alarm_depth=0`` counts every layer treated for collapse;
``alarm_depth=None`` turns the depth count off (the rule before issue 18).

Host values only: the fall is tracked per layer from the readings the checks deliver (a layer
keeps the readings of the last ``alarm_fall_steps`` steps), the depth is its latest reading.
"""

from __future__ import annotations

import math

from .check import Readings
from .sensors import RELATIVE
from .thermostat import floor_severity

FALL_DEPTH = 0.3
"""Effective-rank retention a sudden collapse loses within ``alarm_fall_steps`` steps."""

Reading = tuple[int, float]
"""``(step, effective-rank retention)`` of one check."""


def remember(recent: list[Reading], step: int, retention: float,
             horizon: int) -> list[Reading]:
    """``recent`` with this reading added (when finite) and those older than ``horizon``
    steps dropped (pure)."""
    kept = [(s, r) for s, r in recent if s >= step - horizon]
    if horizon > 0 and math.isfinite(retention):
        kept.append((step, retention))
    return kept


def fall_steps(recent: list[Reading], step: int, retention: float) -> int:
    """Steps since the latest remembered reading at least :data:`FALL_DEPTH` above
    ``retention``; ``-1`` when there is none (a slower fall, or no finite reading).

    Example:
        >>> fall_steps([(0, 1.0), (20, 0.9), (40, 0.7)], 50, 0.45)   # 0.9 - 0.45 >= 0.3
        30
        >>> fall_steps([(40, 0.7)], 50, 0.45)
        -1
    """
    if not math.isfinite(retention):
        return -1
    above = [s for s, r in recent if r >= retention + FALL_DEPTH]
    return step - max(above) if above else -1


def update_fall(recent: list[Reading], fall: int, step: int, retention: float,
                collapsing: bool, horizon: int) -> tuple[list[Reading], int]:
    """One check's update of a layer's ``(recent readings, fall)`` (pure): the fall is looked
    for at each check of a treatment for collapse until found, and forgotten when the treatment
    ends (``-1``)."""
    if not collapsing:
        fall = -1
    elif fall < 0:
        fall = fall_steps(recent, step, retention)
    return remember(recent, step, retention, horizon), fall


def fell_suddenly(fall: int, limit: int) -> bool:
    """Does a fall of ``fall`` steps count toward the quorum (``limit == 0``: any layer)?"""
    return limit == 0 or 0 <= fall <= limit


def collapse_depth(readings: Readings, sensors: dict[str, float]) -> float:
    """The largest severity ``1 - x / t`` among the layer's relative collapse floors
    (``sensors``: ``{name: threshold t}``, as :class:`~.install.GuardedLayer` holds them):
    ``0`` when every reading is at or above its floor, or not finite (pure).

    Example:
        >>> collapse_depth(Readings(effective_rank_retention=0.4), {"effective_rank": 0.5})
        0.19999999999999996
        >>> collapse_depth(Readings(effective_rank_retention=0.6), {"effective_rank": 0.5})
        0.0
    """
    depth = 0.0
    for name, threshold in sensors.items():
        sensor = RELATIVE.get(name)
        if sensor is None or sensor.kind != "collapse" or sensor.bound != "floor":
            continue
        x = getattr(readings, sensor.reading)
        if math.isfinite(x):
            depth = max(depth, floor_severity(x, threshold))
    return depth


def collapsed_deep(depth: float, limit: float | None) -> bool:
    """Does a layer at ``depth`` (:func:`collapse_depth`) count toward the quorum?
    ``limit == 0``: any layer treated for collapse does; ``None``: none (pure)."""
    return limit is not None and (limit == 0 or depth >= limit)


def counts_toward_quorum(fall: int, fall_limit: int, depth: float,
                         depth_limit: float | None) -> bool:
    """A layer treated for collapse counts toward the alarm's quorum when it fell suddenly
    (:func:`fell_suddenly`) or is collapsed deep (:func:`collapsed_deep`) (pure)."""
    return fell_suddenly(fall, fall_limit) or collapsed_deep(depth, depth_limit)
