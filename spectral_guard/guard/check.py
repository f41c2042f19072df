"""The check, as pure functions: a biopsy's singular values -> readings -> verdict -> lambdas.

For a sampled layer with weight ``W`` (``m x n``), its fixed seeded biopsy ``B`` (``r x c``,
``k = min(r, c)``) and a warm power-iteration estimate ``sigma_max(W)``:

* absolute readings of ``B`` from its singular values ``s_1 >= ... >= s_k`` (float64):
  ``SR = sum s_i^2 / s_1^2``, ``erank = exp(-sum p_i log p_i)`` with ``p = s / sum s``,
  ``kappa = s_1 / s_k`` (``inf`` below the storage dtype's rank tolerance), and the ratios
  ``SR / k`` and ``erank / k``;
* relative readings against the layer's baseline (the same readings when it was instrumented,
  or when it first became non-zero): ``erank / erank_0``, ``SR / SR_0``, ``kappa / kappa_0``;
* the verdict: each active sensor (see :mod:`.sensors`) compares its reading with its threshold;
  a kind (collapse, conditioning) is triggered when one of its sensors is, with the largest
  severity among them (:mod:`.thermostat`);
* the thermostat's new lambda per kind.

Nothing here touches a module, a device or a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from ..sensors import (
    condition_number_from_sv,
    effective_rank_from_sv,
    rank_rtol,
    stable_rank_from_sv,
)
from ..thresholds import Rule
from . import thermostat
from .sensors import ABSOLUTE, KINDS, RELATIVE, GuardSensor, Kind

Tensor = torch.Tensor
NAN = math.nan


@dataclass(frozen=True)
class Readings:
    """What one check measured on one layer (``nan`` where not measured)."""

    sigma_max: float = NAN
    effective_rank: float = NAN
    stable_rank: float = NAN
    condition_number: float = NAN
    effective_rank_ratio: float = NAN
    stable_rank_ratio: float = NAN
    fiedler: float = NAN
    effective_rank_retention: float = NAN
    stable_rank_retention: float = NAN
    condition_growth: float = NAN

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


READING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Readings))


@dataclass(frozen=True)
class Baseline:
    """A layer's reference readings (the denominators of the relative sensors)."""

    effective_rank: float
    stable_rank: float
    condition_number: float
    fiedler: float = NAN

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Verdict:
    """Which failure kinds a check found, how severe (in ``[0, 1]``), and why."""

    triggered: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(KINDS, False))
    severity: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    reasons: tuple[str, ...] = ()

    @property
    def fired(self) -> bool:
        return any(self.triggered.values())


def measure(s: Tensor, biopsy_shape: tuple[int, int], storage_dtype: torch.dtype,
            sigma_max: float, fiedler: float = NAN) -> Readings:
    """Absolute readings from the biopsy's descending singular values ``s``."""
    k = max(min(biopsy_shape), 1)
    erank = float(effective_rank_from_sv(s))
    sr = float(stable_rank_from_sv(s))
    kappa = float(condition_number_from_sv(s, rank_rtol(biopsy_shape, storage_dtype)))
    return Readings(sigma_max=float(sigma_max), effective_rank=erank, stable_rank=sr,
                    condition_number=kappa, effective_rank_ratio=erank / k,
                    stable_rank_ratio=sr / k, fiedler=float(fiedler))


def is_zero(r: Readings) -> bool:
    """A layer with nothing to measure yet (e.g. a zero-initialized output projection)."""
    return not (r.sigma_max > 0 and r.effective_rank > 0)


def baseline_from(r: Readings) -> Baseline | None:
    """The readings as a baseline, or ``None`` when they cannot be one (zero or non-finite)."""
    if is_zero(r) or not all(math.isfinite(x) for x in (r.effective_rank, r.stable_rank)):
        return None
    return Baseline(r.effective_rank, r.stable_rank, r.condition_number, r.fiedler)


def relative(r: Readings, base: Baseline | None) -> Readings:
    """``r`` with its retention and growth readings filled in (``nan`` without a baseline)."""
    if base is None:
        return r
    return replace(r, effective_rank_retention=r.effective_rank / base.effective_rank,
                   stable_rank_retention=r.stable_rank / base.stable_rank,
                   condition_growth=_ratio(r.condition_number, base.condition_number))


def _ratio(x: float, base: float) -> float:
    if math.isinf(x) and math.isinf(base):
        return 1.0
    return x / base if base > 0 else NAN


def _compare(sensor: GuardSensor, x: float, threshold: float) -> tuple[bool, float]:
    if sensor.bound == "floor":
        return (thermostat.floor_triggered(x, threshold),
                thermostat.floor_severity(x, threshold))
    return (thermostat.ceiling_triggered(x, threshold),
            thermostat.ceiling_severity(x, threshold))


def judge(r: Readings, sensors: dict[str, float], rule: Rule, min_dim: int,
          collapse_rule: bool = True) -> Verdict:
    """Compare readings with thresholds.

    Args:
        r: the check's readings (relative fields filled in, or ``nan`` without a baseline).
        sensors: the layer's active relative sensors, ``{name: threshold}``.
        rule: the layer's thresholds rule (for the absolute collapse rule).
        min_dim: ``min(m, n)`` of the full weight (the rule's ``collapse_min_dim`` gate).
        collapse_rule: apply the absolute collapse rule (:data:`.sensors.ABSOLUTE`).

    Returns:
        A :class:`Verdict`. A zero layer triggers nothing.
    """
    if is_zero(r):
        return Verdict()
    checks: list[tuple[GuardSensor, float]] = [(RELATIVE[n], t) for n, t in sensors.items()]
    gate = rule.collapse_min_dim
    if collapse_rule and (gate is None or min_dim >= gate):
        checks += [(s, float(getattr(rule, s.field))) for s in ABSOLUTE
                   if getattr(rule, s.field) is not None]
    triggered: dict[str, bool] = dict.fromkeys(KINDS, False)
    severity: dict[str, float] = dict.fromkeys(KINDS, 0.0)
    reasons = []
    for sensor, threshold in checks:
        x = getattr(r, sensor.reading)
        hit, sev = _compare(sensor, x, threshold)
        if hit:
            triggered[sensor.kind] = True
            severity[sensor.kind] = max(severity[sensor.kind], sev)
            sign = "<" if sensor.bound == "floor" else ">"
            reasons.append(f"{sensor.reading} {x:.4g} {sign} {threshold:.4g}")
    return Verdict(triggered, severity, tuple(reasons))


@dataclass(frozen=True)
class Law:
    """The thermostat's constants (see :mod:`.thermostat`)."""

    base: float
    gain: float
    decay: float
    floor: float


def update_lambdas(lambdas: dict[str, float], verdict: Verdict, law: Law) -> dict[str, float]:
    """One thermostat update per failure kind."""
    return {kind: thermostat.update_lambda(lambdas.get(kind, 0.0), verdict.triggered[kind],
                                           verdict.severity[kind], law.base, law.gain,
                                           law.decay, law.floor)
            for kind in KINDS}


@dataclass(frozen=True)
class ConditionPairs:
    """Singular pairs of the biopsy the conditioning term acts on, top pair first."""

    U: Tensor  # r x q
    V: Tensor  # c x q
    log_kappa_max: float
    eps: float


def condition_pairs(U: Tensor, s: Tensor, Vh: Tensor, kappa_max: float) -> ConditionPairs | None:
    """The top pair and every pair with ``s_1 / s_i > kappa_max`` (``None`` if there is none
    beyond the top, or the ceiling is not a positive finite number).

    ``eps = 1e-3 s_1`` bounds the term's force on tiny singular values (see penalties).
    """
    if not (math.isfinite(kappa_max) and kappa_max > 0) or s.numel() < 2:
        return None
    eps = 1e-3 * float(s[0])
    gap = torch.log(s[0] + eps) - torch.log(s + eps) - math.log(kappa_max)
    beyond = torch.nonzero(gap > 0).flatten()
    if beyond.numel() == 0:
        return None
    idx = torch.cat([torch.zeros(1, dtype=torch.long), beyond])
    return ConditionPairs(U[:, idx].contiguous(), Vh[idx].mT.contiguous(), math.log(kappa_max),
                          eps)


__all__ = ["Baseline", "ConditionPairs", "Kind", "Law", "READING_NAMES", "Readings", "Verdict",
           "baseline_from", "condition_pairs", "is_zero", "judge", "measure", "relative",
           "update_lambdas"]
