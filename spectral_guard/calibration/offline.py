""":func:`calibrate`: learn a thresholds file from healthy reference checkpoints.

Each reference is audited once with the audit's own reader, plan and sensors (same mode, biopsy
limit and seed as the audit that will use the file), its files hashed meanwhile; the measured
matrices are grouped and the law of :mod:`spectral_guard.calibration.rule` learns every floor
and ceiling (:mod:`~spectral_guard.calibration.build`); the references are then re-judged
with the result (:mod:`~spectral_guard.calibration.self_audit`). Nothing is written here: the
caller saves :attr:`Calibration.thresholds` when it accepts the calibration (the CLI refuses a
calibration whose references look random or whose self-audit flags a reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .build import GroupCalibration, build_thresholds
from .provenance import ReferenceHasher, provenance, reference_files
from .random_weights import RandomCheck, random_check
from .retention import learn_retention
from .rule import CalibrationRule
from .self_audit import SelfAudit, rejudge

if TYPE_CHECKING:
    from ..audit import MatrixResult, Report
    from ..thresholds import Thresholds


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


def _audit_references(refs: list[Any], *, mode: str, limit: int, seed: int,
                      include: Sequence[str], exclude: Sequence[str], heads: int | None,
                      progress: Callable[[int, int, str], None] | None
                      ) -> tuple[list[Report], list[dict[str, Any]]]:
    """One audit per reference, its files hashed on a thread meanwhile."""
    from ..audit import audit

    reports: list[Report] = []
    described: list[dict[str, Any]] = []
    for ref in refs:
        on_disk = isinstance(ref, (str, Path))
        hasher = ReferenceHasher(reference_files(ref) if on_disk else [])
        hasher.start()
        try:
            report = audit(ref, mode=mode, limit=limit, seed=seed, include=include,
                           exclude=exclude, progress=progress, heads=heads)
        finally:
            hasher.join()
        if hasher.error is not None:
            raise OSError(hasher.error.errno, f"cannot hash: {hasher.error.strerror}",
                          hasher.error.filename)
        reports.append(report)
        where = str(ref) if on_disk else str(report.sources[0].get("path", type(ref).__name__))
        described.append({"path": where, "files": list(hasher.results.values()),
                          "matrices": len(report.matrices)})
    return reports, described


def calibrate(references: Any, *, mode: str = "biopsy", limit: int = 128, seed: int = 0,
              rule: CalibrationRule | None = None, run: bool = False,
              include: Sequence[str] = (), exclude: Sequence[str] = (),
              heads: int | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> Calibration:
    """Learn thresholds from healthy references (module docstring).

    ``references``: one or several of what :func:`spectral_guard.audit` takes (files, sharded
    indexes, folders; models and state_dicts in memory, which have no file to hash), one audit
    per reference. ``run``: the references are successive checkpoints of one training run,
    earliest first (derives the guard's retention fields). ``heads``: attention heads per layer
    for the audit's q-k logit pass, as in :func:`~spectral_guard.audit`. Raises
    :class:`~spectral_guard.checkpoint.CheckpointError` / ``ValueError`` with one-line messages
    for unusable input. Never writes anything: see :meth:`Thresholds.save`.
    """
    rule = rule or CalibrationRule()
    refs = list(references) if isinstance(references, (list, tuple)) else [references]
    if not refs:
        raise ValueError("no reference checkpoint given")
    if run and len(refs) < 2:
        raise ValueError("a run needs at least two references (successive checkpoints of one "
                         "run, earliest first)")
    reports, described = _audit_references(refs, mode=mode, limit=limit, seed=seed,
                                           include=include, exclude=exclude, heads=heads,
                                           progress=progress)
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
        raise ValueError("the run's checkpoints share no matrix (the same names in every "
                         "checkpoint are needed to measure drift)")
    prov = provenance(mode=mode, limit=limit, seed=seed, include=include, exclude=exclude,
                      rule=rule, references=described, run_length=len(refs) if run else None,
                      logit_pairs=sum(getattr(r, "logit_pairs", 0) for r in reports),
                      random=check)
    thresholds, glob, groups = build_thresholds(results, rule, retention, prov)
    thresholds = replace(thresholds, provenance={
        **thresholds.provenance,
        "groups": {g.name: g.to_json_dict() for g in (glob, *groups)}})
    return Calibration(thresholds, glob, groups, described, check,
                       rejudge(results, thresholds), rule, mode, int(limit), run, notes,
                       results)
