"""The per-layer lambda law (ASSR paper, section 3.2) and the severity of a reading.

Severity, in ``[0, 1]``, measured from the threshold ``t``:

* a floor (value must stay above ``t``, e.g. effective-rank retention):
  ``severity = clip(1 - x / t, 0, 1)``: 0 at the threshold, 1 when ``x`` reaches 0;
* a ceiling (value must stay below ``t``, e.g. condition-number growth, Fiedler value):
  ``severity = clip(1 - t / x, 0, 1)``: 0 at the threshold, 1/2 at ``2 t``, 1 as ``x -> inf``.

Update at a check (``triggered`` means the reading crossed its threshold):

* triggered: ``lambda = lambda_base * (1 + gain * severity)``;
* healthy:   ``lambda = decay * lambda``, snapped to 0 once below ``floor * lambda_base``.
"""

from __future__ import annotations

import math


def floor_severity(x: float, threshold: float) -> float:
    """``clip(1 - x / t, 0, 1)`` for a reading that must stay at or above ``t > 0``."""
    if math.isnan(x) or threshold <= 0 or x >= threshold:
        return 0.0
    return min(1.0, max(0.0, 1.0 - x / threshold))


def ceiling_severity(x: float, threshold: float) -> float:
    """``clip(1 - t / x, 0, 1)`` for a reading that must stay at or below ``t > 0``."""
    if math.isnan(x) or x <= threshold:
        return 0.0
    if math.isinf(x) or threshold <= 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - threshold / x))


def floor_triggered(x: float, threshold: float) -> bool:
    return not math.isnan(x) and x < threshold


def ceiling_triggered(x: float, threshold: float) -> bool:
    return not math.isnan(x) and x > threshold


def update_lambda(lam: float, triggered: bool, severity: float, lambda_base: float,
                  gain: float, decay: float, floor: float) -> float:
    """One thermostat update (pure): see the module docstring for the law."""
    if triggered:
        return lambda_base * (1.0 + gain * min(1.0, max(0.0, severity)))
    lam = decay * lam
    return 0.0 if lam < floor * lambda_base else lam


def ceiling_update(lam: float, x: float, threshold: float, lambda_base: float, gain: float,
                   decay: float, floor: float) -> tuple[float, bool]:
    """One check of a reading ``x`` against a ceiling ``t`` (pure): ``(new lambda, triggered)``,
    triggered when ``x > t`` (never for NaN), severity :func:`ceiling_severity`.

    Example:
        >>> ceiling_update(0.0, 2.0, 1.0, lambda_base=0.1, gain=4.0, decay=0.5, floor=0.01)
        (0.30000000000000004, True)
    """
    fired = ceiling_triggered(x, threshold)
    sev = ceiling_severity(x, threshold) if fired else 0.0
    return update_lambda(lam, fired, sev, lambda_base, gain, decay, floor), fired
