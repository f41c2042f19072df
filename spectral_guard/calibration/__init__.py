"""Offline threshold calibration: learn a thresholds file from healthy reference checkpoints so
that every reference passes it (``spectral-guard calibrate``; docs/calibration.md).

Modules, one idea each: :mod:`.rule` (how one floor or ceiling is learned: the law),
:mod:`.groups` (which group a matrix belongs to, and a small group's fallback),
:mod:`.build` (groups -> :class:`~spectral_guard.thresholds.Thresholds`), :mod:`.retention`
(guard fields from a run), :mod:`.random_weights` (do the references look random?),
:mod:`.self_audit` (the references re-judged), :mod:`.provenance`, :mod:`.offline`
(:func:`calibrate` on files and models), :mod:`.render` (table and summary).
``auto_calibrate(model)`` is the guard's: :mod:`spectral_guard.guard.auto`.
"""

from .build import GroupCalibration, build_thresholds
from .offline import Calibration, calibrate
from .random_weights import (
    CalibrationWarning,
    RandomCheck,
    RandomWeightsWarning,
    mp_statistics,
    random_check,
)
from .render import calibration_table, calibration_text
from .retention import learn_retention
from .rule import CalibrationRule, Learned, RuleError, learn, percentile
from .self_audit import SelfAudit, rejudge

__all__ = [
    "Calibration", "CalibrationRule", "CalibrationWarning", "GroupCalibration", "Learned",
    "RandomCheck", "RandomWeightsWarning", "RuleError", "SelfAudit", "build_thresholds",
    "calibrate", "calibration_table", "calibration_text", "learn", "learn_retention",
    "mp_statistics", "percentile", "random_check", "rejudge",
]
