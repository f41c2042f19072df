"""The references re-judged with the thresholds learned from them.

The measurements do not depend on the thresholds, so judging the measured references again
with new thresholds is exactly what ``audit REF --thresholds FILE`` says (tested), without
reading the files a second time. The learned floors and ceilings pass every reference by
construction (:mod:`spectral_guard.calibration.rule`); what can still be flagged is what is not
learned: NaN/Inf entries, dead units and duplicate rows (hygiene limits kept from the shipped
defaults). A calibration whose self-audit flags a reference is refused by the CLI.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..thresholds import Thresholds
from ..verdict import DEFAULT_FAIL_ON, judge

if TYPE_CHECKING:
    from ..audit import MatrixResult


@dataclass
class SelfAudit:
    """How many reference matrices the thresholds flag, by status, and why."""

    matrices: int
    flagged: dict[str, int]
    failing: int
    names: list[str]
    reasons: dict[str, list[str]] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.names

    def describe(self, limit: int = 3) -> str:
        """``name status (reasons); ...`` for the first ``limit`` flagged matrices."""
        parts = [f"{n} {self.statuses[n]} ({'; '.join(self.reasons[n])})"
                 for n in self.names[:limit]]
        more = len(self.names) - limit
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def rejudge(results: Iterable[MatrixResult], thresholds: Thresholds,
            fail_on: Sequence[str] | None = None) -> SelfAudit:
    """Statuses the audit would give these measured matrices under ``thresholds`` (what it
    reads of each: :meth:`~spectral_guard.audit.MatrixResult.observation`)."""
    policy = tuple(DEFAULT_FAIL_ON if fail_on is None else fail_on)
    audit = SelfAudit(0, {}, 0, [])
    for m in results:
        audit.matrices += 1
        status, reasons = judge(m.observation(), thresholds.rule_for(m.name))
        if status != "ok":
            audit.flagged[status] = audit.flagged.get(status, 0) + 1
            audit.names.append(m.name)
            audit.reasons[m.name] = reasons
            audit.statuses[m.name] = status
        audit.failing += status in policy
    return audit
