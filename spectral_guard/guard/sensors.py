"""The guard's sensors, described once.

Each :class:`GuardSensor` says which reading it compares, with which field of the thresholds
:class:`~spectral_guard.thresholds.Rule`, whether that field is a floor (the reading must stay
at or above it) or a ceiling (at or below), which failure it detects (hence which penalty answers
it), and its column in ``guard.report()``.

Two families:

* :data:`RELATIVE` sensors compare a layer with itself at its baseline (the value when it was
  instrumented, or when it first became non-zero): ``erank / erank_0`` and the like. They are
  chosen with ``GuardConfig.sensors``.
* :data:`ABSOLUTE` sensors are the audit's collapse rule (stable rank, stable-rank ratio,
  effective-rank ratio; only when ``min(m, n) >= collapse_min_dim``), read on the guard's
  biopsy. They see a layer that is already collapsed when it is instrumented, which no ratio
  to its own baseline can. On by default (``GuardConfig.collapse_rule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["collapse", "conditioning"]
Bound = Literal["floor", "ceiling"]
KINDS: tuple[Kind, ...] = ("collapse", "conditioning")


@dataclass(frozen=True)
class GuardSensor:
    """One sensor of the guard.

    Attributes:
        name: the name used in ``GuardConfig.sensors`` (relative) or in reasons (absolute).
        field: the :class:`~spectral_guard.thresholds.Rule` field holding its threshold.
        reading: the key of :class:`~spectral_guard.guard.check.Readings` it compares.
        bound: ``"floor"`` or ``"ceiling"``.
        kind: the failure it detects: ``"collapse"`` or ``"conditioning"``.
        column: its header in ``guard.report()``.
    """

    name: str
    field: str
    reading: str
    bound: Bound
    kind: Kind
    column: str


RELATIVE: dict[str, GuardSensor] = {s.name: s for s in (
    GuardSensor("effective_rank", "effective_rank_retention_min", "effective_rank_retention",
                "floor", "collapse", "erank/erank0"),
    GuardSensor("stable_rank", "stable_rank_retention_min", "stable_rank_retention",
                "floor", "collapse", "SR/SR0"),
    GuardSensor("condition_number", "condition_number_growth_max", "condition_growth",
                "ceiling", "conditioning", "kappa/kappa0"),
    GuardSensor("fiedler", "fiedler_max", "fiedler", "ceiling", "collapse", "fiedler"),
)}
"""Sensors that compare a layer with its baseline, selectable with ``GuardConfig.sensors``."""

ABSOLUTE: tuple[GuardSensor, ...] = (
    GuardSensor("stable rank", "stable_rank_min", "stable_rank", "floor", "collapse", "SR"),
    GuardSensor("stable-rank ratio", "stable_rank_ratio_min", "stable_rank_ratio", "floor",
                "collapse", "SR/k"),
    GuardSensor("effective-rank ratio", "effective_rank_ratio_min", "effective_rank_ratio",
                "floor", "collapse", "erank/k"),
)
"""The audit's absolute collapse rule, applied on the guard's biopsy."""

SENSOR_NAMES: tuple[str, ...] = tuple(RELATIVE)
