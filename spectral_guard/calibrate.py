"""Offline threshold calibration: learn a thresholds file from healthy reference checkpoints,
and :func:`auto_calibrate` a :class:`~spectral_guard.guard.config.GuardConfig` for a live model.

**Rule** (the seed paper's, the default; every number is an option of :class:`CalibrationRule`).
For the matrices of one role group (:data:`~spectral_guard.thresholds.ROLE_GROUPS`) and a metric
``x`` measured on each of them by the audit (same reader, sensors, mode and biopsy limit):

* floors (``stable_rank_ratio_min``, ``stable_rank_min``, ``effective_rank_ratio_min``,
  ``alpha_min``): ``P_10(x) * 0.8``;
* ceilings (``condition_number_max``, ``alpha_max``): ``P_90(x) * 1.5`` (``null``, i.e. off,
  when ``P_90`` is infinite: singular matrices among healthy references);

``P_q`` is the linear-interpolation percentile (numpy's default): with the ``n`` values sorted,
``h = q / 100 * (n - 1)`` and ``P_q = x_floor(h) + (h - floor(h)) (x_ceil(h) - x_floor(h))``.
Collapse metrics (stable rank, its ratio, the effective-rank ratio) are learned from matrices
with ``min(m, n) >= collapse_min_dim`` only, the matrices those checks apply to.
A group with fewer than ``min_group`` measured matrices falls back to the global rule (the same
rule learned over every matrix). Hygiene limits (dead units, duplicate rows,
``collapse_min_dim``) are not distributions to learn: they keep the shipped defaults.

**Guard fields** (relative to a layer's value at instrumentation): with ``run=True`` the
references are successive checkpoints of one run, earliest first; for every matrix present in
all of them the drift ``x_k / x_0`` (k >= 1) of effective rank, stable rank and condition number
is pooled per group and the same floor/ceiling rule applied (retention floors from
``P_10 * 0.8``, the growth ceiling from ``P_90 * 1.5``; a percentile past 1 is taken as 1, since
a layer starts at retention 1). Otherwise they keep the shipped
defaults, and the file's provenance says so. Embeddings and output heads are never guarded.

**Random weights.** For an ``m x n`` matrix with i.i.d. entries (any random initialization),
the squared singular values divided by ``q sigma^2`` (``p = min(m, n)``, ``q = max(m, n)``,
``y = p / q``) follow the Marchenko-Pastur law on ``[(1 - sqrt y)^2, (1 + sqrt y)^2]``. With
``sigma^2`` estimated as ``||W||_F^2 / (p q)``, two statistics compare a measured matrix with
that law: the top edge ``e = sigma_max sqrt(p) / (||W||_F (1 + sqrt y))`` (1 at the MP edge;
training grows outlier directions, e > 1) and the effective rank relative to the MP spectrum's
``r = erank(W) / erank(MP_{p, q})`` (training concentrates the spectrum, r < 1). A matrix is
*MP-like* when ``e <= 1.08`` and ``r >= 0.96``; a reference set whose MP-like fraction exceeds
one half (over matrices with both measured sides ``>= 16``) looks randomly initialized. Measured
(docs/calibration.md): random-init matrices e in 0.91..1.01, r in 0.989..1.012 (all MP-like);
trained hidden layers e >= 1.15, r <= 0.93; trained models 1-3 MP-like matrices of 15 (their
small embeddings).

The q-k attention logit scale is not reported by the audit, so it gets no threshold.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .random_init import (
    MP_EDGE_MAX,
    MP_ERANK_MIN,
    MP_MIN_SIDE,
    RANDOM_FRACTION,
    is_mp_like,
    mp_quantiles,
    mp_spectrum_statistics,
)
from .thresholds import (
    ROLE_GROUPS,
    Group,
    Rule,
    Thresholds,
    default_thresholds,
    load_thresholds,
    role_group,
)

if TYPE_CHECKING:
    from torch import nn

    from .auditing import MatrixResult, Report
    from .guard.config import GuardConfig

# ----------------------------------------------------------------------------------------------
# The rule

FLOORS: dict[str, str] = {
    "stable_rank_ratio_min": "stable_rank_ratio",
    "stable_rank_min": "stable_rank",
    "effective_rank_ratio_min": "effective_rank_ratio",
    "alpha_min": "alpha",
}
"""Floor fields learned as ``P_floor(metric) * floor_margin``: field -> MatrixResult metric."""

CEILINGS: dict[str, str] = {
    "condition_number_max": "condition_number",
    "alpha_max": "alpha",
}
"""Ceiling fields learned as ``P_ceiling(metric) * ceiling_margin``."""

COLLAPSE_METRICS = ("stable_rank", "stable_rank_ratio", "effective_rank_ratio")
"""Metrics learned only from matrices the collapse checks apply to (``min side >= min dim``)."""

HYGIENE_FIELDS = ("dead_unit_fraction_max", "duplicate_row_fraction_max", "collapse_min_dim")
"""Kept from the shipped defaults (limits on defects, not distributions)."""

RETENTION = {
    "effective_rank_retention_min": ("effective_rank", "floor"),
    "stable_rank_retention_min": ("stable_rank", "floor"),
    "condition_number_growth_max": ("condition_number", "ceiling"),
}
"""Guard fields derived from a run (``--run``): field -> (metric whose drift is used, kind)."""

GUARD_FIELDS = (*RETENTION, "fiedler_max")
UNGUARDED_GROUPS = ("heads", "embeddings")
"""Role groups the guard never penalizes (their guard fields stay null), as in the shipped
defaults: one direction dominates an embedding or an output head by nature."""

_SHIPPED_EXAMPLE = {"heads": "lm_head.weight", "embeddings": "model.embed_tokens.weight",
                    "attention": "model.layers.0.self_attn.q_proj.weight",
                    "mlp": "model.layers.0.mlp.up_proj.weight", "other": "model.other.weight"}
"""A name per role group, to read that group's shipped hygiene/guard fields."""


@dataclass(frozen=True)
class CalibrationRule:
    """Percentiles and margins of the rule (see the module docstring); defaults: the paper's."""

    floor_percentile: float = 10.0
    floor_margin: float = 0.8
    ceiling_percentile: float = 90.0
    ceiling_margin: float = 1.5
    min_group: int = 8

    def __post_init__(self) -> None:
        for name in ("floor_percentile", "ceiling_percentile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name.replace('_', '-')} must be in [0, 100], got {value}")
        for name in ("floor_margin", "ceiling_margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number, got "
                                 f"{value}")
        if self.min_group < 1:
            raise ValueError(f"min-group must be at least 1, got {self.min_group}")


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


@dataclass
class Learned:
    """One learned threshold: ``value = at_percentile * margin`` (``None``: check off)."""

    field: str
    value: float | None
    percentile: float
    at_percentile: float | None
    margin: float
    n: int
    note: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("field")
        for key in ("value", "at_percentile"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d


def _learn(field_name: str, values: list[float], kind: str, rule: CalibrationRule) -> Learned:
    q, margin = ((rule.floor_percentile, rule.floor_margin) if kind == "floor"
                 else (rule.ceiling_percentile, rule.ceiling_margin))
    if not values:
        return Learned(field_name, None, q, None, margin, 0, "no measured value: check off")
    at = percentile(values, q)
    if math.isinf(at):
        return Learned(field_name, None, q, at, margin, len(values),
                       f"P{q:g} is infinite (singular matrices): check off")
    return Learned(field_name, _round(at * margin), q, at, margin, len(values))


def _round(x: float) -> float:
    """Four significant digits: thresholds are not more precise than that."""
    return float(f"{x:.4g}")


def _metric_values(results: Iterable[MatrixResult], metric: str, min_dim: float | None
                   ) -> list[float]:
    out = []
    for m in results:
        if metric in COLLAPSE_METRICS and min_dim is not None and min(m.shape) < min_dim:
            continue
        value = getattr(m, metric)
        if value is None or (metric == "condition_number" and m.nonfinite):
            continue
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and metric != "condition_number"):
            continue
        out.append(value)
    return out


def learn_absolute(results: Sequence[MatrixResult], rule: CalibrationRule,
                   min_dim: float | None) -> dict[str, Learned]:
    """Floors and ceilings of the audit fields from one population of matrices."""
    learned = {f: _learn(f, _metric_values(results, metric, min_dim), "floor", rule)
               for f, metric in FLOORS.items()}
    learned.update({f: _learn(f, _metric_values(results, metric, min_dim), "ceiling", rule)
                    for f, metric in CEILINGS.items()})
    return learned


def learn_retention(runs: Sequence[Sequence[MatrixResult]], rule: CalibrationRule
                    ) -> dict[str, dict[str, Learned]]:
    """Guard fields per role group from successive checkpoints of one run (earliest first).

    For each matrix present in every checkpoint: drift ``x_k / x_0`` for k >= 1 (``x_0`` the
    earliest), pooled per group (and over all matrices, key ``"*"``)."""
    first = {m.name: m for m in runs[0]}
    later = [{m.name: m for m in results} for results in runs[1:]]
    drift: dict[str, dict[str, list[float]]] = {}
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
                for key in (role_group(name), "*"):
                    drift.setdefault(key, {}).setdefault(field_name, []).append(value / base)
    out = {group: {f: _learn(f, values.get(f, []), RETENTION[f][1], rule) for f in RETENTION}
           for group, values in drift.items()}
    for learned in out.values():
        for f, item in learned.items():
            _clamp_to_start(item, RETENTION[f][1])
    return out


def _clamp_to_start(item: Learned, kind: str) -> None:
    """A layer starts at retention (and growth) 1: a floor learned from drifts above 1 is set
    from 1 (``1 x margin``), a ceiling from drifts below 1 likewise, so the guard never fires on
    a layer that has not moved."""
    if item.at_percentile is None or item.value is None:
        return
    if (kind == "floor" and item.at_percentile > 1) or (kind == "ceiling"
                                                        and item.at_percentile < 1):
        item.value = _round(item.margin)
        item.note = f"P{item.percentile:g} {item.at_percentile:.4g} is past 1 (no drift): " \
                    "set from 1"


# ----------------------------------------------------------------------------------------------
# Random weights (Marchenko-Pastur: spectral_guard.random_init)


def mp_statistics(m: MatrixResult) -> tuple[float, float] | None:
    """``(e, r)`` of one audited matrix (module docstring), or ``None`` when not judged."""
    if m.sigma_max is None or m.frobenius is None or m.effective_rank is None \
            or not m.frobenius > 0:
        return None
    return mp_spectrum_statistics(m.sigma_max / m.frobenius, m.effective_rank,
                                  m.measured_shape)


@dataclass
class RandomCheck:
    """How many judged matrices look like Marchenko-Pastur noise, and the verdict."""

    judged: int
    mp_like: int
    examples: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.mp_like / self.judged if self.judged else 0.0

    @property
    def looks_random(self) -> bool:
        return self.judged > 0 and self.fraction > RANDOM_FRACTION

    def message(self, subject: str = "the references") -> str:
        return (f"{self.mp_like} of {self.judged} matrices have Marchenko-Pastur spectra "
                f"(top edge <= {MP_EDGE_MAX}, effective rank >= {MP_ERANK_MIN} of MP's): "
                f"{subject} look randomly initialized, and thresholds learned from them fit no "
                "trained model")

    def to_json_dict(self) -> dict[str, Any]:
        return {"judged": self.judged, "mp_like": self.mp_like,
                "fraction": round(self.fraction, 4), "looks_random": self.looks_random,
                "bound": {"edge_max": MP_EDGE_MAX, "erank_ratio_min": MP_ERANK_MIN,
                          "min_side": MP_MIN_SIDE, "fraction": RANDOM_FRACTION},
                "examples": self.examples}


def random_check(results: Iterable[MatrixResult]) -> RandomCheck:
    """Count the MP-like matrices (see the module docstring)."""
    judged = mp_like = 0
    examples: list[str] = []
    for m in results:
        stats = mp_statistics(m)
        if stats is None:
            continue
        judged += 1
        if is_mp_like(*stats):
            mp_like += 1
            if len(examples) < 5:
                examples.append(m.name)
    return RandomCheck(judged, mp_like, examples)


class CalibrationWarning(UserWarning):
    """Calibration went ahead, but something about its input deserves a look."""


class RandomWeightsWarning(CalibrationWarning):
    """The weights being calibrated on look randomly initialized."""


# ----------------------------------------------------------------------------------------------
# Building the thresholds


@dataclass
class GroupCalibration:
    """The learned rule of one role group, or its fallback to the global rule."""

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


def _values(learned: dict[str, Learned]) -> dict[str, float | None]:
    return {k: v.value for k, v in learned.items()}


def _subset(rule: Rule, names: Iterable[str]) -> dict[str, float | None]:
    return {n: getattr(rule, n) for n in names}


def build_thresholds(results: Sequence[MatrixResult], rule: CalibrationRule,
                     retention: dict[str, dict[str, Learned]] | None = None,
                     provenance: dict[str, Any] | None = None
                     ) -> tuple[Thresholds, GroupCalibration, list[GroupCalibration]]:
    """The calibrated :class:`Thresholds`, the global calibration and one per role group.

    Every role group is written (first match wins, so a group left out would let its matrices
    fall into ``other``); a group with fewer than ``rule.min_group`` measured matrices gets
    only its shipped hygiene/guard fields, i.e. the global rule for every learned field.
    """
    shipped = default_thresholds()
    min_dim = shipped.default.collapse_min_dim
    measured = [m for m in results if m.nonfinite == 0 and m.sigma_max is not None]
    glob_learned = learn_absolute(measured, rule, min_dim)
    glob_guard = (retention or {}).get("*", {})
    glob = GroupCalibration("global", "", len(measured), False, glob_learned, glob_guard)
    default = replace(shipped.default, **_values(glob_learned), **_values(glob_guard))
    groups: list[GroupCalibration] = []
    out_groups = []
    for name, pattern in ROLE_GROUPS:
        members = [m for m in measured if role_group(m.name) == name]
        shipped_rule = shipped.rule_for(_SHIPPED_EXAMPLE[name])
        overrides = _subset(shipped_rule, HYGIENE_FIELDS)
        guard_learned: dict[str, Learned] = {}
        if name in UNGUARDED_GROUPS:
            overrides.update(dict.fromkeys(GUARD_FIELDS))
        else:
            overrides.update(_subset(shipped_rule, GUARD_FIELDS))
            if retention is not None:
                guard_learned = retention.get(name, {})
                enough = guard_learned and all(v.n >= rule.min_group
                                               for v in guard_learned.values())
                if not enough:
                    guard_learned = {}
                overrides.update(_values(guard_learned or glob_guard))
        fallback = len(members) < rule.min_group
        learned = {} if fallback else learn_absolute(members, rule, min_dim)
        overrides.update(_values(learned))
        groups.append(GroupCalibration(name, pattern, len(members), fallback, learned,
                                       guard_learned))
        out_groups.append(Group(name, pattern, overrides))
    thresholds = Thresholds(default, tuple(out_groups), dict(provenance or {}))
    return thresholds, glob, groups


# ----------------------------------------------------------------------------------------------
# Provenance: sizes and sha256 of the references, hashed while the audit streams them

HASH_BLOCK = 8 * 1024 * 1024


class _Hasher(threading.Thread):
    """sha256 and size of files, on a background thread started with the audit of a reference.

    Both read the file front to back at about the same time, so the disk is read once: the
    second reader of each page finds it in the page cache. ``hashlib`` releases the GIL on
    large blocks, so hashing overlaps with the audit's decompositions."""

    def __init__(self, files: Sequence[Path]) -> None:
        super().__init__(daemon=True, name="spectral-guard-sha256")
        self.files = list(files)
        self.results: dict[str, dict[str, Any]] = {}
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            for path in self.files:
                digest = hashlib.sha256()
                size = 0
                with open(path, "rb", buffering=0) as fh:
                    while block := fh.read(HASH_BLOCK):
                        digest.update(block)
                        size += len(block)
                self.results[str(path)] = {"path": str(path), "bytes": size,
                                           "sha256": digest.hexdigest()}
        except OSError as exc:  # reported by the caller; the audit raises its own error first
            self.error = exc


def _reference_files(path: str | Path) -> list[Path]:
    """The regular files a reference reads (a file, an index and its shards, a folder's)."""
    from .checkpoint import CheckpointError, resolve_source

    p = Path(path)
    try:
        source = resolve_source(p)
    except (CheckpointError, OSError, ValueError):
        return [p] if p.is_file() else []
    files = [f.path for f in source.files]
    if source.kind == "index":
        files.insert(0, source.path)
    return files


# ----------------------------------------------------------------------------------------------
# calibrate()


@dataclass
class SelfAudit:
    """The references re-judged with the new thresholds (same measurements)."""

    matrices: int
    flagged: dict[str, int]
    failing: int
    names: list[str]

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Calibration:
    """What :func:`calibrate` learned; :attr:`thresholds` is what gets written."""

    thresholds: Thresholds
    glob: GroupCalibration
    groups: list[GroupCalibration]
    references: list[dict[str, Any]]
    random: RandomCheck
    self_audit: SelfAudit
    rule: CalibrationRule
    mode: str
    limit: int
    run: bool
    warnings: list[str] = field(default_factory=list)
    matrices: list[MatrixResult] = field(default_factory=list, repr=False)
    """The measured reference matrices (not serialized)."""

    @property
    def looks_random(self) -> bool:
        return self.random.looks_random

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": "spectral_guard.calibration",
            "thresholds": self.thresholds.to_dict(),
            "global": self.glob.to_json_dict(),
            "groups": {g.name: g.to_json_dict() for g in self.groups},
            "references": self.references,
            "random_weights": self.random.to_json_dict(),
            "self_audit": self.self_audit.to_json_dict(),
            "warnings": list(self.warnings),
        }


def rejudge(results: Iterable[MatrixResult], thresholds: Thresholds,
            fail_on: Sequence[str] | None = None) -> SelfAudit:
    """Statuses the audit would give these measured matrices under ``thresholds``.

    The measurements do not depend on the thresholds, so this equals auditing the same files
    again with the same mode, limit and seed (tested), without reading them a second time."""
    from .verdict import DEFAULT_FAIL_ON, Observation, judge

    policy = tuple(DEFAULT_FAIL_ON if fail_on is None else fail_on)
    flagged: dict[str, int] = {}
    names: list[str] = []
    failing = n = 0
    for m in results:
        n += 1
        rows, cols = m.shape
        finite = m.nonfinite == 0
        obs = Observation(
            min_dim=min(rows, cols), rows=rows, cols=cols, nonfinite=m.nonfinite,
            dead_rows=m.dead_rows, dead_cols=m.dead_cols, stable_rank=m.stable_rank,
            stable_rank_ratio=m.stable_rank_ratio, effective_rank_ratio=m.effective_rank_ratio,
            condition_number=m.condition_number if finite else None, alpha=m.alpha,
            duplicate_rows=m.duplicate_rows, duplicate_sample=m.duplicate_sample)
        status, _reasons = judge(obs, thresholds.rule_for(m.name))
        if status != "ok":
            flagged[status] = flagged.get(status, 0) + 1
            names.append(m.name)
        failing += status in policy
    return SelfAudit(n, flagged, failing, names)


def calibrate(references: str | Path | Sequence[str | Path], *, mode: str = "biopsy",
              limit: int = 128, seed: int = 0, rule: CalibrationRule | None = None,
              run: bool = False, include: Sequence[str] = (), exclude: Sequence[str] = (),
              progress: Callable[[int, int, str], None] | None = None) -> Calibration:
    """Learn thresholds from healthy reference checkpoints (see the module docstring).

    ``references``: the inputs :func:`spectral_guard.audit` takes (files, sharded indexes,
    folders; models and state_dicts in memory, which have no file to hash), one audit per
    reference. ``run``: the references are successive checkpoints of
    one training run, earliest first (derives the guard's retention floors). Raises
    :class:`~spectral_guard.checkpoint.CheckpointError` / ``ValueError`` with one-line messages
    for unusable input. Never writes anything: see :meth:`Thresholds.save`.
    """
    from .auditing import audit

    rule = rule or CalibrationRule()
    refs = [references] if isinstance(references, (str, Path)) else list(references)
    if not refs:
        raise ValueError("no reference checkpoint given")
    if run and len(refs) < 2:
        raise ValueError("--run needs at least two references (successive checkpoints of one "
                         "run, earliest first)")
    reports: list[Report] = []
    provenance_refs: list[dict[str, Any]] = []
    for ref in refs:
        on_disk = isinstance(ref, (str, Path))
        hasher = _Hasher(_reference_files(ref) if on_disk else [])
        hasher.start()
        try:
            report = audit(ref, mode=mode, limit=limit, seed=seed, include=include,
                           exclude=exclude, progress=progress)
        finally:
            hasher.join()
        if hasher.error is not None:
            raise OSError(hasher.error.errno, f"cannot hash: {hasher.error.strerror}",
                          hasher.error.filename)
        reports.append(report)
        where = str(ref) if on_disk else str(report.sources[0].get("path", type(ref).__name__))
        provenance_refs.append({"path": where, "files": list(hasher.results.values()),
                                "matrices": len(report.matrices)})
    results = [m for r in reports for m in r.matrices]
    notes: list[str] = []
    nonfinite = [m.name for m in results if m.nonfinite]
    if nonfinite:
        have = "matrix has" if len(nonfinite) == 1 else "matrices have"
        notes.append(f"{len(nonfinite)} reference {have} NaN/Inf values (e.g. {nonfinite[0]}): "
                     "are the references healthy?")
    check = random_check(results)
    retention = learn_retention([r.matrices for r in reports], rule) if run else None
    if run and not retention:
        raise ValueError("--run: the references share no matrix (same names in every "
                         "checkpoint are needed to measure drift)")
    created = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    provenance: dict[str, Any] = {
        "source": "spectral-guard calibrate",
        "created": created,
        "tool": f"spectral_guard {__version__}",
        "mode": mode, "limit": int(limit), "seed": int(seed),
        "include": list(include), "exclude": list(exclude),
        "rule": asdict(rule),
        "references": provenance_refs,
        "guard_fields": (f"derived from a run of {len(refs)} checkpoints (drift from the first)"
                         if run else "shipped defaults: no run given (calibrate --run with "
                         "successive checkpoints of one run derives them)"),
        "hygiene_fields": "shipped defaults (" + ", ".join(HYGIENE_FIELDS) + ")",
        "q_k_logit_scale": "not reported by the audit: no threshold",
        "random_weights": check.to_json_dict(),
    }
    thresholds, glob, groups = build_thresholds(results, rule, retention, provenance)
    thresholds = replace(thresholds, provenance={
        **thresholds.provenance,
        "groups": {g.name: g.to_json_dict() for g in (glob, *groups)}})
    for g in groups:
        if g.fallback and g.matrices:
            notes.append(f"group {g.name}: {g.matrices} matri{'x' if g.matrices == 1 else 'ces'}"
                         f", fewer than {rule.min_group}: uses the global rule")
    audit_again = rejudge(results, thresholds)
    if audit_again.flagged:
        notes.append(f"the new thresholds flag {sum(audit_again.flagged.values())} of "
                     f"{audit_again.matrices} reference matrices (a warning sign: are the "
                     "references healthy, or the margins too tight?)")
    return Calibration(thresholds, glob, groups, provenance_refs, check, audit_again, rule,
                       mode, int(limit), run, notes, results)


# ----------------------------------------------------------------------------------------------
# auto_calibrate(model)


@dataclass(frozen=True)
class Tier:
    """Guard sampling settings for models up to ``max_params`` parameters."""

    name: str
    max_params: float
    ratio: float
    every: int
    biopsy_limit: int
    lambda_l2: float
    paper_biopsy_limit: int


TIERS: tuple[Tier, ...] = (
    Tier("< 100M", 100e6, 0.10, 1, 192, 1e-4, 1024),
    Tier("100M-500M", 500e6, 0.05, 2, 256, 5e-5, 768),
    Tier("500M-2B", 2e9, 0.02, 5, 256, 2e-5, 512),
    Tier("> 2B", math.inf, 0.01, 10, 256, 1e-5, 384),
)
"""The seed paper's tier table with our biopsy limits (the paper's in ``paper_biopsy_limit``).

Departure, measured with ``bench/tier_costs.py`` (docs/calibration.md): on this 2-core CPU one
biopsy decomposition costs 0.9 ms at 192, 1.7 ms at 256, 8.9 ms at 512, 24 ms at 768 and 60 ms
at 1024 (66x the default's; ``svd`` for the conditioning sensor 2.8 ms vs 269 ms). Biopsy
limits are capped at 256, and models under 100M parameters (short steps, where the fixed cost
per check weighs most) keep the guard's default 192. ``lambda_l2`` is the paper's base lambda
for its L2 actuator; for the spectral actuator the same ladder is applied to its own default
base (``0.05 * lambda_l2 / 1e-4``)."""


def tier_for(n_params: int) -> Tier:
    """The tier of a model with ``n_params`` parameters (boundaries belong to the upper tier:
    exactly 100M is ``100M-500M``)."""
    return next(t for t in TIERS if n_params < t.max_params)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters' element count (tied weights once; meta tensors count too)."""
    return sum(p.numel() for p in model.parameters())


def _named_matrices(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every floating parameter with >= 2 dims, under its plain name
    (an instrumented layer's ``parametrizations.weight.original`` is reported as ``weight``)."""
    for name, p in model.named_parameters():
        if p.ndim >= 2 and p.is_floating_point():
            yield name.replace(".parametrizations.weight.original", ".weight"), p.detach()


def measure_model(model: nn.Module, *, limit: int = 128, seed: int = 0) -> list[MatrixResult]:
    """Audit-style measurements of a live model's matrices (biopsy mode, the audit's biopsy and
    sensors; no hygiene scan). Meta tensors are skipped."""
    from .auditing import CONV1D_MAX_KERNEL, MatrixResult, audit_biopsy_indices
    from .estimators import name_seed
    from .sensors import metrics_from_singular_values, rank_rtol

    out: list[MatrixResult] = []
    for name, p in _named_matrices(model):
        if p.is_meta:
            continue
        if p.ndim == 3 and p.shape[2] > CONV1D_MAX_KERNEL:
            mats = [(f"{name}[{e}]", p[e]) for e in range(p.shape[0])]
        else:
            mats = [(name, p.reshape(p.shape[0], -1))]
        for mname, W in mats:
            shape = (int(W.shape[0]), int(W.shape[1]))
            rows, cols = audit_biopsy_indices(shape, limit, name_seed(seed, name))
            B = W
            if rows is not None:
                B = B.index_select(0, rows.to(B.device))
            if cols is not None:
                B = B.index_select(1, cols.to(B.device))
            B = B.to("cpu", torch.float64)
            result = MatrixResult(name=mname, tensor=name, file="<model>", shape=shape,
                                  tensor_shape=tuple(p.shape), dtype=str(p.dtype).split(".")[-1],
                                  group=None, mode="biopsy", measured_shape=tuple(B.shape))
            bad = int((~torch.isfinite(B)).sum())
            if bad:
                result.nonfinite = result.nan = bad
            else:
                s = torch.linalg.svdvals(B)
                met = metrics_from_singular_values(s, tuple(B.shape),
                                                   rank_rtol(tuple(B.shape), p.dtype), alpha=True)
                for key in ("stable_rank", "stable_rank_ratio", "condition_number", "sigma_max",
                            "sigma_min", "frobenius", "effective_rank", "effective_rank_ratio"):
                    setattr(result, key, getattr(met, key))
                result.singular = math.isinf(met.condition_number)
                result.alpha = met.alpha if math.isfinite(met.alpha) else None
            out.append(result)
    return out


def auto_calibrate(model: nn.Module, thresholds: Thresholds | str | Path | None = None, *,
                   actuator: str = "spectral", seed: int = 0, limit: int = 128,
                   rule: CalibrationRule | None = None, allow_random: bool = False,
                   **overrides: Any) -> GuardConfig:
    """A :class:`~spectral_guard.guard.config.GuardConfig` for ``model``: sampling settings
    from its parameter count (:data:`TIERS`), thresholds from ``thresholds`` (a file or a
    :class:`Thresholds`) or, when ``None``, learned from the model's own weights with the
    calibration rule (global and per role group; guard fields: shipped defaults).

    A model whose weights look randomly initialized (Marchenko-Pastur spectra, see the module
    docstring) gets a :class:`RandomWeightsWarning`, and the shipped default thresholds instead
    of thresholds learned from noise unless ``allow_random=True``. A model on the meta device
    cannot be measured: shipped defaults, with a warning. ``overrides`` replace any GuardConfig
    field (e.g. ``ratio=0.2``). Render it with
    :func:`spectral_guard.guard.config.render_config`.
    """
    from .guard.config import DEFAULT_LAMBDA_BASE, GuardConfig

    if actuator not in DEFAULT_LAMBDA_BASE:
        raise ValueError(f"actuator must be one of {', '.join(DEFAULT_LAMBDA_BASE)}, "
                         f"got {actuator!r}")
    n_params = count_parameters(model)
    tier = tier_for(n_params)
    scale = DEFAULT_LAMBDA_BASE[actuator] / DEFAULT_LAMBDA_BASE["l2"]
    info: dict[str, Any] = {"parameters": n_params, "tier": tier.name, "ratio": tier.ratio,
                            "every": tier.every, "biopsy_limit": tier.biopsy_limit,
                            "lambda_base": tier.lambda_l2 * scale, "actuator": actuator}
    if thresholds is not None:
        th = thresholds if isinstance(thresholds, Thresholds) else load_thresholds(thresholds)
        source = "object" if isinstance(thresholds, Thresholds) else str(thresholds)
        info["thresholds"] = f"given ({source})"
    else:
        th = _thresholds_from_model(model, seed=seed, limit=limit,
                                    rule=rule or CalibrationRule(), allow_random=allow_random,
                                    info=info)
    th = replace(th, provenance={**th.provenance, "auto_calibrate": info})
    settings = {"ratio": tier.ratio, "every": tier.every, "biopsy_limit": tier.biopsy_limit,
                "lambda_base": tier.lambda_l2 * scale, "actuator": actuator, "seed": seed,
                "thresholds": th}
    unknown = sorted(set(overrides) - {f.name for f in fields(GuardConfig)})
    if unknown:
        raise TypeError(f"unknown GuardConfig field(s): {', '.join(unknown)}")
    return GuardConfig(**{**settings, **overrides})


def _thresholds_from_model(model: nn.Module, *, seed: int, limit: int, rule: CalibrationRule,
                           allow_random: bool, info: dict[str, Any]) -> Thresholds:
    shipped = default_thresholds()
    if any(p.is_meta for _n, p in _named_matrices(model)):
        msg = "model has meta tensors: its weights cannot be measured; using the shipped " \
              "default thresholds"
        warnings.warn(msg, CalibrationWarning, stacklevel=3)
        info["thresholds"] = "shipped defaults (meta tensors: not measured)"
        return shipped
    results = measure_model(model, limit=limit, seed=seed)
    check = random_check(results)
    subject = "the model's weights"
    info["random_weights"] = check.to_json_dict()
    if check.looks_random:
        if not allow_random:
            warnings.warn(check.message(subject) + "; using the shipped default "
                          "thresholds (allow_random=True learns from them anyway)",
                          RandomWeightsWarning, stacklevel=3)
            info["thresholds"] = "shipped defaults (weights look random)"
            return shipped
        warnings.warn(check.message(subject) + "; learning from them anyway "
                      "(allow_random=True)", RandomWeightsWarning, stacklevel=3)
    if not results:
        info["thresholds"] = "shipped defaults (no matrix to measure)"
        return shipped
    info["thresholds"] = f"learned from the model's {len(results)} matrices"
    provenance = {"source": "spectral_guard.auto_calibrate", "tool": f"spectral_guard "
                  f"{__version__}", "mode": "biopsy", "limit": int(limit), "seed": int(seed),
                  "rule": asdict(rule), "guard_fields": "shipped defaults"}
    th, _glob, _groups = build_thresholds(results, rule, None, provenance)
    return th


# ----------------------------------------------------------------------------------------------
# Rendering


def _fmt(x: float | None) -> str:
    if x is None:
        return "off"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if (abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-2)) else f"{x:.4g}"


def _cell(learned: Learned | None, fallback: bool) -> str:
    if fallback:
        return "global"
    if learned is None:
        return "-"
    if learned.value is None:
        return "off"
    return f"{_fmt(learned.value)} (P{learned.percentile:g} {_fmt(learned.at_percentile)})"


SUMMARY_FIELDS = ("stable_rank_ratio_min", "stable_rank_min", "effective_rank_ratio_min",
                  "condition_number_max", "alpha_min", "alpha_max")


def calibration_table(cal: Calibration):  # -> rich.table.Table
    """Per group: matrices and each learned threshold with the percentile it came from."""
    from rich.table import Table

    table = Table(title=f"spectral-guard calibrate ({cal.mode}"
                  + (f", limit {cal.limit}" if cal.mode == "biopsy" else "") + ")",
                  header_style="bold")
    short = {"stable_rank_ratio_min": "SR/k min", "stable_rank_min": "SR min",
             "effective_rank_ratio_min": "erank/k min", "condition_number_max": "kappa max",
             "alpha_min": "alpha min", "alpha_max": "alpha max"}
    table.add_column("group")
    table.add_column("matrices", justify="right")
    for f in SUMMARY_FIELDS:
        table.add_column(short[f], justify="right")
    if cal.run:
        table.add_column("erank retention", justify="right")
    for g in [cal.glob, *cal.groups]:
        label = g.name
        cells = [_cell(g.learned.get(f), g.fallback) for f in SUMMARY_FIELDS]
        row = [label, str(g.matrices), *cells]
        if cal.run:
            guard = g.guard.get("effective_rank_retention_min")
            row.append("-" if g.name in UNGUARDED_GROUPS else _cell(guard, False)
                       if guard else "global")
        table.add_row(*row)
    return table


def calibration_text(cal: Calibration, out: str | Path | None) -> str:
    """The paragraph printed under the table."""
    sa = cal.self_audit
    flagged = sum(sa.flagged.values())
    where = f"Wrote {out}. " if out is not None else "Nothing written. "
    text = (f"{where}Rule: floors P{cal.rule.floor_percentile:g} x {cal.rule.floor_margin:g}, "
            f"ceilings P{cal.rule.ceiling_percentile:g} x {cal.rule.ceiling_margin:g}; groups "
            f"with fewer than {cal.rule.min_group} matrices use the global rule. "
            f"Self-audit: the new thresholds flag {flagged} of {sa.matrices} reference "
            f"matrices")
    if flagged:
        text += " (" + ", ".join(f"{n} {s}" for s, n in sa.flagged.items()) + "): " \
                + ", ".join(sa.names[:5]) + (", ..." if len(sa.names) > 5 else "")
    return text + "."


__all__ = [
    "TIERS", "Calibration", "CalibrationRule", "CalibrationWarning", "RandomWeightsWarning",
    "auto_calibrate", "build_thresholds", "calibrate", "calibration_table", "mp_quantiles",
    "percentile", "random_check", "tier_for",
]
