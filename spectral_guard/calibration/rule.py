"""How one floor or ceiling is learned so that the references it is learned from pass it.

**The law.** For one group of reference matrices and a metric ``x`` the audit reports for each
of them (``x_1 .. x_n``, only the values the audit's verdict reads: see :func:`metric_values`):

* a floor (``stable_rank_min``, ``stable_rank_ratio_min``, ``effective_rank_ratio_min``,
  ``alpha_min``) is ``min(base, r * min_i x_i)``;
* a ceiling (``condition_number_max``, ``alpha_max``, the q-k logit limits) is
  ``max(base, max_i x_i / r)``, and off (``null``) when ``max_i x_i`` is infinite (a singular
  reference: no finite ceiling passes it);

with ``r = reference_margin`` (default 0.9, in ``(0, 1]``) and ``base``

* ``P_floor(x) * floor_margin`` / ``P_ceiling(x) * ceiling_margin`` (defaults: the seed paper's
  ``P10 x 0.8`` and ``P90 x 1.5``; off when that percentile is infinite) when the group has at
  least ``min_group`` values;
* otherwise, and always for the q-k logit limits (:data:`WIDEN_ONLY`), the value the caller
  passes as the group's fallback (the shipped rule of the group's own role: see
  :mod:`spectral_guard.calibration.groups`); an off fallback stays off.

``row_stable_rank_min`` is not learned: it is the shipped value of the group's role, forwarded
(:mod:`spectral_guard.calibration.build` starts every group from its role's full rule). The
verdict reads it only where ``SR < stable_rank_min``, and the learned ``stable_rank_min`` is at
most ``r min_i SR_i``, so it cannot fail a reference.

Floors are rounded down and ceilings up to four significant digits. Hence every reference
passes every learned check by construction: the verdict flags ``x < floor`` and
``x > ceiling``, and ``floor <= r min x <= x <= max x <= max x / r <= ceiling``. ``r < 1``
leaves every reference at least ``1 - r`` inside its limits.

``P_q`` is the linear-interpolation percentile (numpy's default): with the ``n`` values
sorted, ``h = q / 100 * (n - 1)`` and ``P_q = x_floor(h) + (h - floor(h)) (x_ceil(h) -
x_floor(h))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from ..thresholds import Rule

if TYPE_CHECKING:
    from ..audit import MatrixResult

FLOORS: dict[str, str] = {
    "stable_rank_ratio_min": "stable_rank_ratio",
    "stable_rank_min": "stable_rank",
    "effective_rank_ratio_min": "effective_rank_ratio",
    "alpha_min": "alpha",
}
"""Floor fields: rule field -> the audited metric it bounds from below."""

_RULE_FIELDS = {f.name for f in fields(Rule)}
CEILINGS: dict[str, str] = {
    f: metric for f, metric in (("condition_number_max", "condition_number"),
                                ("alpha_max", "alpha"),
                                ("logit_typical_max", "logit_typical"),
                                ("logit_scale_max", "logit_scale"))
    if f in _RULE_FIELDS
}
"""Ceiling fields: rule field -> the audited metric it bounds from above (``logit_typical``,
``logit_scale``: the q-k logit statistics the audit's attention pass puts on both matrices of
a pair)."""

WIDEN_ONLY = ("logit_typical_max", "logit_scale_max")
"""Ceilings that start from the fallback (the shipped rule of the group's role) whatever the
group's size, and are only raised where a reference exceeds it: the audit's q-k logit limits
separate healthy from runaway heads across models (docs/audit.md), so one model's percentiles
would only make them tighter than that evidence supports."""

COLLAPSE_METRICS = ("stable_rank", "stable_rank_ratio", "effective_rank_ratio")
"""The verdict reads these only when ``min(m, n) >= collapse_min_dim``; only those values are
learned from."""

SIGNIFICANT = 4
"""Thresholds are written with four significant digits (floors rounded down, ceilings up)."""


class RuleError(ValueError):
    """A calibration rule setting out of range; ``option`` names the setting."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option} {message}")
        self.option = option
        self.detail = message


@dataclass(frozen=True)
class CalibrationRule:
    """Percentiles and margins of the law (module docstring). Defaults: the seed paper's
    ``P10 x 0.8`` / ``P90 x 1.5``, groups of at least 8, every reference at least 10% inside."""

    floor_percentile: float = 10.0
    floor_margin: float = 0.8
    ceiling_percentile: float = 90.0
    ceiling_margin: float = 1.5
    min_group: int = 8
    reference_margin: float = 0.9

    def __post_init__(self) -> None:
        for name in ("floor_percentile", "ceiling_percentile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise RuleError(name, f"must be in [0, 100], got {value}")
        for name in ("floor_margin", "ceiling_margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise RuleError(name, f"must be a positive number, got {value}")
        if not 0.0 < self.reference_margin <= 1.0:
            raise RuleError("reference_margin", f"must be in (0, 1], got "
                            f"{self.reference_margin}")
        if self.min_group < 1:
            raise RuleError("min_group", f"must be at least 1, got {self.min_group}")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile ``P_q`` (numpy's default method); ``+inf`` values are
    allowed (an interpolation that touches one is ``inf``). ``values`` must be non-empty."""
    x = sorted(float(v) for v in values)
    if not x:
        raise ValueError("percentile of no values")
    h = q / 100.0 * (len(x) - 1)
    lo = math.floor(h)
    hi = min(lo + 1, len(x) - 1)
    frac = h - lo
    if frac == 0.0 or x[hi] == x[lo]:
        return x[lo]
    if math.isinf(x[hi]):
        return math.inf
    return x[lo] + frac * (x[hi] - x[lo])


def round_toward(x: float, kind: str) -> float:
    """``x`` to :data:`SIGNIFICANT` digits, rounded down for a floor and up for a ceiling, so
    rounding never moves a limit past a reference."""
    if x == 0 or not math.isfinite(x):
        return x
    r = float(f"{x:.{SIGNIFICANT}g}")
    if (kind == "floor" and r <= x) or (kind == "ceiling" and r >= x):
        return r
    step = 10.0 ** (math.floor(math.log10(abs(r))) - SIGNIFICANT + 1)
    r = float(f"{(r - step if kind == 'floor' else r + step):.{SIGNIFICANT}g}")
    ok = r <= x if kind == "floor" else r >= x
    return r if ok else x


@dataclass
class Learned:
    """One learned threshold (``value`` ``None``: check off) and where it came from.

    ``source``: ``"percentile"`` (``at_percentile * margin``), ``"fallback"`` (the group's
    fallback, ``fallback_from`` says which) or ``"none"`` (no value measured: the fallback
    unchanged). ``extreme`` is the smallest (floor) or largest (ceiling) reference value;
    ``widened`` is true when the law moved the value to ``extreme`` times the reference margin.
    """

    field: str
    value: float | None
    kind: str
    n: int
    source: str
    percentile: float | None = None
    at_percentile: float | None = None
    margin: float | None = None
    extreme: float | None = None
    widened: bool = False
    fallback_from: str = ""
    note: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("field")
        for key in ("value", "at_percentile", "extreme"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d


def metric_values(results: Iterable[MatrixResult], metric: str,
                  min_dim: float | None) -> list[float]:
    """The values of ``metric`` the verdict would read on these matrices: collapse metrics only
    where ``min(m, n) >= min_dim``; no value of a matrix with NaN/Inf entries; ``None``/NaN
    never (unmeasured); ``+inf`` only for the condition number (a singular matrix)."""
    out = []
    for m in results:
        if m.nonfinite:
            continue
        if metric in COLLAPSE_METRICS and min_dim is not None and min(m.shape) < min_dim:
            continue
        value = getattr(m, metric, None)
        if value is None:
            continue
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and metric != "condition_number"):
            continue
        out.append(value)
    return out


def learn(field_name: str, values: Sequence[float], kind: str, rule: CalibrationRule,
          fallback: float | None, fallback_from: str, percentile_rule: bool = True) -> Learned:
    """One threshold by the law (module docstring). ``kind``: ``"floor"`` or ``"ceiling"``;
    ``fallback``: the value used when fewer than ``rule.min_group`` values were measured, or
    always when ``percentile_rule`` is false."""
    n = len(values)
    if n == 0:
        return Learned(field_name, fallback, kind, 0, "none", fallback_from=fallback_from,
                       note="no measured value: " + fallback_from)
    floor = kind == "floor"
    extreme = min(values) if floor else max(values)
    if percentile_rule and n >= rule.min_group:
        q, margin = ((rule.floor_percentile, rule.floor_margin) if floor
                     else (rule.ceiling_percentile, rule.ceiling_margin))
        at = percentile(values, q)
        item = Learned(field_name, None if math.isinf(at) else at * margin, kind, n,
                       "percentile", q, at, margin, extreme)
        if math.isinf(at):
            item.note = f"P{q:g} is infinite (singular references): check off"
    else:
        item = Learned(field_name, fallback, kind, n, "fallback", extreme=extreme,
                       fallback_from=fallback_from,
                       note=(f"{n} value{'s' if n != 1 else ''}, fewer than "
                             f"{rule.min_group}: " if percentile_rule else "")
                       + fallback_from)
    if item.value is None:
        return item
    if floor:
        bound = extreme * rule.reference_margin
        if bound < item.value:
            item.value, item.widened = bound, True
    else:
        bound = extreme / rule.reference_margin
        if math.isinf(bound):
            item.value, item.widened = None, True
            item.note = "a reference is singular (kappa = inf): check off"
            return item
        if bound > item.value:
            item.value, item.widened = bound, True
    item.value = round_toward(item.value, kind)
    return item


def learn_fields(results: Sequence[MatrixResult], rule: CalibrationRule, min_dim: float | None,
                 fallback: Rule, fallback_from: str) -> dict[str, Learned]:
    """Every floor and ceiling (:data:`FLOORS`, :data:`CEILINGS`) of one group of matrices,
    with ``fallback``'s values for the fields measured on fewer than ``rule.min_group``."""
    learned = {}
    for table, kind in ((FLOORS, "floor"), (CEILINGS, "ceiling")):
        for f, metric in table.items():
            learned[f] = learn(f, metric_values(results, metric, min_dim), kind, rule,
                               getattr(fallback, f), fallback_from, f not in WIDEN_ONLY)
    return learned


def values_of(learned: dict[str, Learned]) -> dict[str, float | None]:
    """``{field: value}`` of learned thresholds."""
    return {k: v.value for k, v in learned.items()}
