"""Groups of measured reference matrices -> a :class:`~spectral_guard.thresholds.Thresholds`.

Every group (:mod:`spectral_guard.calibration.groups`) is written, in matching order, with the
full rule of its role from the shipped defaults, its learned floors and ceilings
(:mod:`spectral_guard.calibration.rule`) on top, and its guard fields (shipped, null for the
unguarded groups, or learned from a run). The file's ``default`` is the rule learned over the
hidden-layer matrices (attention, MLP, other; the ``global`` row): no matrix of the references
reaches it (``other`` matches every name), a matrix of another model only if a future group
pattern lets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..thresholds import Group, Thresholds, default_thresholds
from .groups import (
    HIDDEN_ROLES,
    UNGUARDED_GROUPS,
    group_names,
    group_of,
    pattern_of,
    shipped_rule,
    shipped_source,
)
from .retention import GUARD_FIELDS
from .rule import CalibrationRule, Learned, learn_fields, values_of

if TYPE_CHECKING:
    from ..audit import MatrixResult

HYGIENE_FIELDS = ("dead_unit_fraction_max", "duplicate_row_fraction_max", "collapse_min_dim")
"""Kept from the shipped rule of each role (limits on defects, not distributions)."""


@dataclass
class GroupCalibration:
    """What one group learned. ``fallback``: fewer than ``min_group`` members, so its fields
    are its role's shipped rule widened to pass them."""

    name: str
    pattern: str
    matrices: int
    fallback: bool
    learned: dict[str, Learned]
    guard: dict[str, Learned] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {"matrices": self.matrices, "fallback": self.fallback,
                "thresholds": {k: v.to_json_dict() for k, v in self.learned.items()},
                "guard": {k: v.to_json_dict() for k, v in self.guard.items()}}


def build_thresholds(results: Sequence[MatrixResult], rule: CalibrationRule,
                     retention: dict[str, dict[str, Learned]] | None = None,
                     provenance: dict[str, Any] | None = None,
                     shipped: Thresholds | None = None
                     ) -> tuple[Thresholds, GroupCalibration, list[GroupCalibration]]:
    """The calibrated thresholds, the ``global`` (hidden-layer) calibration and one per group.

    ``retention``: guard fields per group learned from a run
    (:func:`~spectral_guard.calibration.retention.learn_retention`); ``None`` keeps the shipped
    guard fields."""
    shipped = shipped or default_thresholds()
    usable = [m for m in results if m.nonfinite == 0]
    members: dict[str, list[MatrixResult]] = {}
    for m in usable:
        members.setdefault(group_of(m), []).append(m)
    hidden = [m for g in HIDDEN_ROLES for m in members.get(g, [])]
    glob = GroupCalibration("global", "", len(hidden), len(hidden) < rule.min_group,
                            learn_fields(hidden, rule, shipped.default.collapse_min_dim,
                                         shipped.default, "shipped default rule"))
    default = replace(shipped.default, **values_of(glob.learned))
    groups: list[GroupCalibration] = []
    out_groups = []
    for name in group_names(results):
        own = members.get(name, [])
        role_rule = shipped_rule(name, shipped)
        overrides = asdict(role_rule)
        guard: dict[str, Learned] = {}
        if name in UNGUARDED_GROUPS:
            overrides.update(dict.fromkeys(GUARD_FIELDS))
        elif retention is not None and name in retention:
            guard = retention[name]
            overrides.update(values_of(guard))
        learned = learn_fields(own, rule, role_rule.collapse_min_dim, role_rule,
                               shipped_source(name, shipped))
        overrides.update(values_of(learned))
        pattern = pattern_of(name, results)
        groups.append(GroupCalibration(name, pattern, len(own), len(own) < rule.min_group,
                                       learned, guard))
        out_groups.append(Group(name, pattern, overrides))
    return Thresholds(default, tuple(out_groups), dict(provenance or {})), glob, groups
