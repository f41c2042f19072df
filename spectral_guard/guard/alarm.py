"""The guard's alarm: the signature of a learning rate too high for the model.

The alarm gates the matrix sign (:mod:`.msign`) and the learning-rate back-off
(:mod:`.backoff`). It is raised at a step when either

* **a quorum of layers collapsed suddenly**: at least ``msign_quorum`` of the penalized layers
  are treated for collapse, and each of them, at some check of that treatment, had lost at
  least :data:`FALL_DEPTH` of effective-rank retention within the last ``msign_fall``
  optimizer steps (its *fall*: the steps since its latest reading at least ``FALL_DEPTH``
  above that check's; the baseline reads 1); or
* an attention pair's latest scale is over ``msign_alarm`` times its target.

Why the fall: healthy training lowers the effective rank of some layers too (the query and key
projections first), slowly. In ``bench/efficacy.py``'s models at the recipe's learning rate
the layers that reached the collapse trigger took 120 to 290 steps from retention 0.8, and on a
4-layer model four of 24 got there within 50 steps of each other, which a plain quorum of
treated layers took for the alarm (one seed of two signed a healthy run at step 220 and ended
6% worse; over 1200 steps the 3-layer model's healthy runs were signed on both seeds, +5.5%).
At 4x and 16x that learning rate and under the LR shock they fell in 7 to 36 steps
(``bench/alarm_timeline.py``; docs/efficacy.md). ``msign_fall=0`` counts every layer treated
for collapse, however slowly it fell (the rule before the fall existed).

The fall is tracked per layer on the host from the readings the checks deliver: no device
work, and a layer keeps only the readings of the last ``msign_fall`` steps.
"""

from __future__ import annotations

import math

FALL_DEPTH = 0.3
"""Effective-rank retention a sudden collapse loses within ``msign_fall`` steps."""

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
