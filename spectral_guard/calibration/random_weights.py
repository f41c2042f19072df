"""Do the references look randomly initialized? Thresholds learned from noise fit no trained
model, so :func:`~spectral_guard.calibration.calibrate` reports it and the CLI refuses to write.

Each audited matrix is compared with the Marchenko-Pastur law of an i.i.d. random matrix
(:mod:`spectral_guard.random_init`: the top-edge statistic ``e`` and the effective rank ``r``
relative to MP's, from what the audit already measured); a reference set whose MP-like fraction
exceeds :data:`~spectral_guard.random_init.RANDOM_FRACTION` looks random. Measured bounds and
populations: docs/calibration.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..random_init import (
    MP_EDGE_MAX,
    MP_ERANK_MIN,
    MP_MIN_SIDE,
    RANDOM_FRACTION,
    is_mp_like,
    mp_spectrum_statistics,
)

if TYPE_CHECKING:
    from ..audit import MatrixResult


class CalibrationWarning(UserWarning):
    """Calibration went ahead, but something about its input deserves a look."""


class RandomWeightsWarning(CalibrationWarning):
    """The weights being calibrated on look randomly initialized."""


def mp_statistics(m: MatrixResult) -> tuple[float, float] | None:
    """``(e, r)`` of one audited matrix, or ``None`` when it is not judged."""
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
    """Count the MP-like matrices among audited ones."""
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
