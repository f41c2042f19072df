"""The guard's alarm: the signature of a learning rate too high for the model.

The alarm gates the matrix sign (:mod:`.msign`) and the learning-rate back-off
(:mod:`.backoff`). It is raised at a step when either

* **a quorum of layers collapsed deep**: at least ``msign_quorum`` of the penalized layers are
  treated for collapse, and each of them reads, at its latest check, a relative collapse
  reading (effective-rank or stable-rank retention, ``x / x_0``) at or below
  ``(1 - msign_depth)`` times that sensor's floor ``t``, i.e. its *depth*, the thermostat's
  severity ``1 - x / t`` (:func:`.thermostat.floor_severity`), is at least ``msign_depth``; or
* an attention pair's latest scale is over ``msign_alarm`` times its target.

The law counts no time: neither optimizer steps, nor check periods, nor the learning rate, so
it reads the same at any run length, check period or schedule; a layer checked every 1000
steps is judged on its latest reading like one checked every step (only later). Healthy
training lowers the effective rank of some layers too (the query and key projections first),
and over a long run a few of them drift just under the floor; a learning rate too high drives
many of them far below it. ``msign_depth=0`` counts every layer treated for collapse (the rule
before the alarm had a second condition).

What was tried instead, and why it does not scale (the fall's duration in steps, per unit of
the layer's relative movement ``||W_s - W_a|| / ||W_a||`` or of the learning rate applied;
measured with ``bench/alarm_scale.py``): docs/efficacy.md, "Issue 18, item 2".

Host values only: the latest readings the checks delivered, no device work, no state.
"""

from __future__ import annotations

import math

from .check import Readings
from .sensors import RELATIVE
from .thermostat import floor_severity


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


def collapsed_deep(depth: float, limit: float) -> bool:
    """Does a layer at ``depth`` (:func:`collapse_depth`) count toward the quorum?
    ``limit == 0``: any layer treated for collapse does (pure)."""
    return limit == 0 or depth >= limit
