"""Metric values + a :class:`~spectral_guard.thresholds.Rule` -> status and reasons (pure).

Statuses, in order of precedence (a matrix gets the first that applies; ``reasons`` lists every
check that failed, worst first):

``nonfinite``        at least one NaN or +-Inf entry. The spectral metrics are not computed.
``dead_units``       the fraction of all-zero rows (dead output units) or of all-zero columns
                     (dead inputs) exceeds ``dead_unit_fraction_max``. An all-zero matrix is here.
``collapsed``        ``min(m, n) >= collapse_min_dim`` and any of:
                     ``SR < stable_rank_min`` and ``row_SR < row_stable_rank_min`` (one
                     direction holds the energy and the rows, scaled to unit norm, point the
                     same way); ``SR / min(m, n) < stable_rank_ratio_min``;
                     ``erank / min(m, n) < effective_rank_ratio_min`` where ``SR >=
                     stable_rank_min``. Where ``SR < stable_rank_min`` the rows decide: a
                     matrix whose energy sits in a few output channels of large norm that
                     point different ways (``row_SR >= row_stable_rank_min``) is not collapsed,
                     and its low effective rank (the same few channels) is not read either.
                     A ``None`` row floor or row value leaves ``SR < stable_rank_min`` alone
                     deciding (the law before the row check).
``ill_conditioned``  ``kappa > condition_number_max`` (a singular matrix has ``kappa = inf``).
``logit_risk``       an attention pair's typical q-k logit scale ``max_h tau_h``
                     (``logit_typical``: the RMS logit of isotropic unit-RMS inputs, see
                     :mod:`spectral_guard.audit.logit`) exceeds ``logit_typical_max``, or its
                     worst-case bound ``max_h s_h n`` (``logit_scale``) exceeds
                     ``logit_scale_max`` (off in the shipped defaults; a calibrated ceiling).
                     Not in the default fail policy.
``suspicious``       the fraction of near-duplicate rows exceeds ``duplicate_row_fraction_max``,
                     or alpha lies outside ``[alpha_min, alpha_max]``.
``ok``               none of the above.

A ``None`` threshold switches its check off; a ``None`` metric (not measured) never fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .thresholds import Rule

STATUSES: tuple[str, ...] = ("nonfinite", "dead_units", "collapsed", "ill_conditioned",
                             "logit_risk", "suspicious", "ok")
"""Every status, most severe first (the precedence order)."""

DEFAULT_FAIL_ON: tuple[str, ...] = ("collapsed", "nonfinite", "dead_units")


def severity(status: str) -> int:
    """0 for the most severe status, ``len(STATUSES) - 1`` for ``ok``."""
    return STATUSES.index(status)


@dataclass(frozen=True)
class Observation:
    """What was measured on one matrix; ``None`` where a value was not measured.

    ``min_dim`` is ``min(m, n)`` of the full matrix; the ratios are those of the measured
    (possibly biopsied) matrix. ``duplicate_rows`` counts near-duplicates among
    ``duplicate_sample`` examined rows. ``logit_scale`` (``max_h s_h n``) and ``logit_typical``
    (``max_h tau_h``) are those of the attention pair the matrix belongs to (``None``: not part
    of a measured pair).
    """

    min_dim: int
    rows: int
    cols: int
    nonfinite: int = 0
    dead_rows: int = 0
    dead_cols: int = 0
    stable_rank: float | None = None
    stable_rank_ratio: float | None = None
    row_stable_rank: float | None = None
    effective_rank_ratio: float | None = None
    condition_number: float | None = None
    alpha: float | None = None
    duplicate_rows: int | None = None
    duplicate_sample: int | None = None
    logit_scale: float | None = None
    logit_typical: float | None = None


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4g}"


def _below(value: float | None, floor: float | None) -> bool:
    return value is not None and floor is not None and value < floor


def _collapse_reasons(obs: Observation, rule: Rule) -> list[str]:
    """The failed collapse checks (module docstring), each as one string."""
    out = []
    sr, sr_min = obs.stable_rank, rule.stable_rank_min
    row, row_min = obs.row_stable_rank, rule.row_stable_rank_min
    dominated = _below(sr, sr_min)  # one direction holds the energy
    spread = dominated and row is not None and row_min is not None and row >= row_min
    if dominated and not spread:
        out.append(f"stable rank {_fmt(sr)} < {_fmt(sr_min)}"
                   + (f" and row-normalized stable rank {_fmt(row)} < {_fmt(row_min)}"
                      if row is not None and row_min is not None else ""))
    if _below(obs.stable_rank_ratio, rule.stable_rank_ratio_min):
        out.append(f"stable-rank ratio {_fmt(obs.stable_rank_ratio)} < "
                   f"{_fmt(rule.stable_rank_ratio_min)}")
    if not spread and _below(obs.effective_rank_ratio, rule.effective_rank_ratio_min):
        out.append(f"effective-rank ratio {_fmt(obs.effective_rank_ratio)} < "
                   f"{_fmt(rule.effective_rank_ratio_min)}")
    return out


def judge(obs: Observation, rule: Rule) -> tuple[str, list[str]]:
    """Status (see module docstring) and every failed check as a short human string."""
    found: dict[str, list[str]] = {s: [] for s in STATUSES}
    if obs.nonfinite > 0:
        total = obs.rows * obs.cols
        found["nonfinite"].append(f"{obs.nonfinite} of {total} entries are NaN/Inf")
    limit = rule.dead_unit_fraction_max
    if obs.rows and obs.cols and obs.dead_rows == obs.rows:
        found["dead_units"].append("all entries are zero")
    elif limit is not None:
        for count, total, what in ((obs.dead_rows, obs.rows, "rows"),
                                   (obs.dead_cols, obs.cols, "columns")):
            if total and count / total > limit:
                found["dead_units"].append(
                    f"{count}/{total} all-zero {what} ({_fmt(count / total)} > {_fmt(limit)})")
    min_dim_ok = rule.collapse_min_dim is None or obs.min_dim >= rule.collapse_min_dim
    if min_dim_ok:
        found["collapsed"].extend(_collapse_reasons(obs, rule))
    kappa, kmax = obs.condition_number, rule.condition_number_max
    if kappa is not None and kmax is not None and kappa > kmax:
        what = "singular (kappa = inf)" if math.isinf(kappa) else f"kappa {_fmt(kappa)}"
        found["ill_conditioned"].append(f"{what} > {_fmt(kmax)}")
    for value, limit, label in ((obs.logit_typical, rule.logit_typical_max, "typical q-k logit"),
                                (obs.logit_scale, rule.logit_scale_max, "q-k logit bound")):
        if value is not None and limit is not None and value > limit:
            found["logit_risk"].append(f"{label} {_fmt(value)} > {_fmt(limit)}")
    dmax = rule.duplicate_row_fraction_max
    if obs.duplicate_rows is not None and obs.duplicate_sample and dmax is not None:
        frac = obs.duplicate_rows / obs.duplicate_sample
        if frac > dmax:
            found["suspicious"].append(f"{obs.duplicate_rows}/{obs.duplicate_sample} "
                                       f"near-duplicate rows ({_fmt(frac)} > {_fmt(dmax)})")
    if obs.alpha is not None and not math.isnan(obs.alpha):
        if rule.alpha_min is not None and obs.alpha < rule.alpha_min:
            found["suspicious"].append(f"alpha {_fmt(obs.alpha)} < {_fmt(rule.alpha_min)}")
        if rule.alpha_max is not None and obs.alpha > rule.alpha_max:
            found["suspicious"].append(f"alpha {_fmt(obs.alpha)} > {_fmt(rule.alpha_max)}")
    reasons = [r for s in STATUSES for r in found[s]]
    status = next((s for s in STATUSES if found[s]), "ok")
    return status, reasons


def fails(status: str, fail_on: tuple[str, ...] | list[str] | set[str]) -> bool:
    """True when ``status`` is one the policy fails on."""
    return status in fail_on
