"""The guard's fields from successive checkpoints of one run (``calibrate --run``).

The guard's thresholds are relative to a layer's value at instrumentation. With references that
are successive checkpoints of one run, earliest first, the drift ``x_k / x_0`` (k >= 1) of every
matrix present in all of them is pooled per calibration group, and the law of
:mod:`spectral_guard.calibration.rule` learns ``effective_rank_retention_min``,
``stable_rank_retention_min`` (floors) and ``condition_number_growth_max`` (a ceiling) from it,
so the healthy run itself never triggers the guard. A layer starts at retention 1: a floor
learned from drifts above 1 is capped at ``1 x floor_margin`` and a ceiling from drifts below 1
raised to ``1 x ceiling_margin``, so the guard never fires on a layer that has not moved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..thresholds import Thresholds, default_thresholds
from .groups import UNGUARDED_GROUPS, group_of, shipped_rule, shipped_source
from .rule import CalibrationRule, Learned, learn, round_toward

if TYPE_CHECKING:
    from ..audit import MatrixResult

RETENTION = {
    "effective_rank_retention_min": ("effective_rank", "floor"),
    "stable_rank_retention_min": ("stable_rank", "floor"),
    "condition_number_growth_max": ("condition_number", "ceiling"),
}
"""Guard fields derived from a run: field -> (metric whose drift is used, kind)."""

GUARD_FIELDS = (*RETENTION, "fiedler_max")


def drifts(runs: Sequence[Sequence[MatrixResult]]) -> dict[str, dict[str, list[float]]]:
    """``{group: {guard field: [x_k / x_0, ...]}}`` over the matrices present in every run."""
    first = {m.name: m for m in runs[0]}
    later = [{m.name: m for m in results} for results in runs[1:]]
    out: dict[str, dict[str, list[float]]] = {}
    for name, m0 in first.items():
        if not all(name in r for r in later):
            continue
        for field_name, (metric, _kind) in RETENTION.items():
            base = getattr(m0, metric)
            for r in later:
                value = getattr(r[name], metric)
                if base is None or value is None or not (0 < base < math.inf) \
                        or not math.isfinite(value):
                    continue
                out.setdefault(group_of(m0), {}).setdefault(field_name, []).append(
                    value / base)
    return out


def learn_retention(runs: Sequence[Sequence[MatrixResult]], rule: CalibrationRule,
                    shipped: Thresholds | None = None) -> dict[str, dict[str, Learned]]:
    """Guard fields per group (unguarded groups excluded) from successive checkpoints of one
    run, earliest first; a group with fewer than ``rule.min_group`` drifts of a field keeps the
    shipped value of its role."""
    shipped = shipped or default_thresholds()
    out: dict[str, dict[str, Learned]] = {}
    for group, values in drifts(runs).items():
        if group in UNGUARDED_GROUPS:
            continue
        fallback = shipped_rule(group, shipped)
        learned = {}
        for f, (_metric, kind) in RETENTION.items():
            item = learn(f, values.get(f, []), kind, rule, getattr(fallback, f),
                         shipped_source(group, shipped))
            _clamp_to_start(item, rule)
            learned[f] = item
        out[group] = learned
    return out


def _clamp_to_start(item: Learned, rule: CalibrationRule) -> None:
    """A layer starts at retention (and growth) 1 (module docstring)."""
    if item.source != "percentile" or item.value is None or item.at_percentile is None:
        return
    if item.kind == "floor" and item.at_percentile > 1:
        cap = round_toward(rule.floor_margin, "floor")
        if item.value > cap:
            item.value = cap
    elif item.kind == "ceiling" and item.at_percentile < 1:
        cap = round_toward(rule.ceiling_margin, "ceiling")
        if item.value < cap:
            item.value = cap
    else:
        return
    item.note = f"P{item.percentile:g} {item.at_percentile:.4g} is past 1 (no drift): " \
                "limited to 1 x margin"
