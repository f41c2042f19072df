"""The audit's result objects: :class:`MatrixResult` (one audited matrix), :class:`Skipped`
(a tensor not audited, and why) and :class:`Report` (the whole audit: verdict, JSON).

They hold values; nothing here reads a checkpoint or computes a metric. The rendering (rich
table, CSV) is :mod:`spectral_guard.report`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .. import __version__
from ..thresholds import Thresholds
from ..verdict import STATUSES, Observation

SCHEMA_VERSION = 1
"""Version of the JSON report (``Report.to_json_dict``); bumped on incompatible changes."""


def _num(x: float | None) -> float | None:
    """JSON-safe number: ``None`` for missing, NaN or infinite values."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


_FLOAT_FIELDS = ("stable_rank", "stable_rank_ratio", "row_stable_rank", "condition_number",
                 "sigma_max", "sigma_min", "frobenius", "effective_rank", "effective_rank_ratio",
                 "alpha", "logit_scale", "logit_typical")


@dataclass
class MatrixResult:
    """One audited matrix. Spectral values are those of the measured matrix (the biopsy in
    biopsy mode, see ``measured_shape``) and ``None`` when the matrix has non-finite entries.
    ``row_stable_rank`` is the stable rank of the measured matrix with its rows scaled to unit
    norm (:mod:`spectral_guard.audit.rows`).

    ``read_as`` says how its tensor was read (:mod:`spectral_guard.audit.plan`): ``"linear"``
    (a 2-D weight), ``"embedding"`` (a 2-D weight named as an embedding), ``"conv"`` (a
    kernel ``[out, in, k...]`` flattened to ``out x (in * k ...)``), ``"experts[e]"`` (matrix
    ``e`` of a stack of experts) or ``"fused_qkv[q]"``/``[k]``/``[v]`` (a block of a fused
    q/k/v projection, named ``tensor[q]`` etc.; ``shape`` is the block's). The ``logit_*``
    values are those of the attention pair the matrix belongs to
    (:mod:`spectral_guard.audit.logit`): per head, the worst-case bound ``s_h n``
    (``logit_head_scales``; maximum ``logit_scale``, reached by head ``logit_head``) and the
    typical scale ``tau_h`` (``logit_head_typical``; maximum ``logit_typical``, reached by head
    ``logit_typical_head``)."""

    name: str
    tensor: str
    file: str
    shape: tuple[int, int]
    tensor_shape: tuple[int, ...]
    dtype: str
    group: str | None
    mode: str
    measured_shape: tuple[int, int]
    read_as: str = "linear"
    status: str = "ok"
    reasons: list[str] = field(default_factory=list)
    stable_rank: float | None = None
    stable_rank_ratio: float | None = None
    row_stable_rank: float | None = None
    condition_number: float | None = None
    singular: bool = False
    sigma_max: float | None = None
    sigma_min: float | None = None
    frobenius: float | None = None
    effective_rank: float | None = None
    effective_rank_ratio: float | None = None
    alpha: float | None = None
    nonfinite: int = 0
    nan: int = 0
    inf: int = 0
    dead_rows: int = 0
    dead_cols: int = 0
    duplicate_rows: int | None = None
    duplicate_sample: int | None = None
    logit_scale: float | None = None
    logit_head: int | None = None
    logit_pair: str | None = None
    logit_head_scales: list[float] | None = None
    logit_typical: float | None = None
    logit_typical_head: int | None = None
    logit_head_typical: list[float] | None = None

    def observation(self) -> Observation:
        """What the verdict reads of this result (its condition number only when the matrix
        is finite and was decomposed)."""
        m, n = self.shape
        return Observation(
            min_dim=min(m, n), rows=m, cols=n, nonfinite=self.nonfinite,
            dead_rows=self.dead_rows, dead_cols=self.dead_cols,
            stable_rank=self.stable_rank, stable_rank_ratio=self.stable_rank_ratio,
            row_stable_rank=self.row_stable_rank, effective_rank_ratio=self.effective_rank_ratio,
            condition_number=self.condition_number if self.nonfinite == 0 else None,
            alpha=self.alpha, duplicate_rows=self.duplicate_rows,
            duplicate_sample=self.duplicate_sample, logit_scale=self.logit_scale,
            logit_typical=self.logit_typical)

    def to_json_dict(self) -> dict:
        d = asdict(self)
        for key in ("shape", "tensor_shape", "measured_shape"):
            d[key] = list(d[key])
        for key in _FLOAT_FIELDS:
            d[key] = _num(d[key])
        for key in ("logit_head_scales", "logit_head_typical"):
            if d[key] is not None:
                d[key] = [_num(x) for x in d[key]]
        return d


@dataclass
class Skipped:
    """A tensor that is not audited, and why."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    reason: str

    def to_json_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class Report:
    """The result of :func:`~spectral_guard.audit.audit`; the CLI renders it,
    :meth:`to_json_dict` serializes it."""

    sources: list[dict]
    thresholds: Thresholds
    thresholds_source: str
    mode: str
    limit: int
    seed: int
    fail_on: tuple[str, ...]
    matrices: list[MatrixResult]
    skipped: list[Skipped]
    filtered_out: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    logit_pairs: int = 0
    logit_notes: list[str] = field(default_factory=list)
    logit_needs_heads: bool = False
    """Attention pairs were found but no head count: the logit pass did not run."""
    plan_notes: list[str] = field(default_factory=list)
    """How tensors were read, where a user should know (fused projections audited whole)."""
    alpha_estimator: str = "csn"
    """Which HT-SR estimator gave ``alpha`` (:data:`~spectral_guard.sensors.ALPHA_ESTIMATORS`)."""

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for m in self.matrices:
            counts[m.status] += 1
        return counts

    @property
    def failing(self) -> list[MatrixResult]:
        return [m for m in self.matrices if m.status in self.fail_on]

    @property
    def healthy(self) -> bool:
        return not self.failing

    @property
    def exit_code(self) -> int:
        """0 when no matrix fails the ``fail_on`` policy, else 1."""
        return 0 if self.healthy else 1

    def verdict_text(self) -> str:
        """A short paragraph: what was audited, what was found, what fails the policy."""
        n = len(self.matrices)
        counts = self.status_counts()
        found = ", ".join(f"{c} {s}" for s, c in counts.items() if c and s != "ok")
        head = (f"Audited {n} matri{'x' if n == 1 else 'ces'} from {self._origin()} in "
                f"{self.mode} mode"
                + (f" (limit {self.limit}, seed {self.seed})" if self.mode == "biopsy" else "")
                + f"; {len(self.skipped)} tensor(s) skipped.")
        notes = "".join(f" Note: {n}" for n in self.notes)
        if not found:
            return head + f" All {n} are ok. HEALTHY: nothing fails the policy " \
                          f"({', '.join(self.fail_on) or 'none'})." + notes
        body = f" Findings: {found}; {counts['ok']} ok."
        failing = self.failing
        if not failing:
            return head + body + f" HEALTHY: no finding fails the policy " \
                                 f"({', '.join(self.fail_on) or 'none'})." + notes
        names = ", ".join(m.name for m in failing[:5]) + (", ..." if len(failing) > 5 else "")
        one = len(failing) == 1
        return (head + body + f" FAIL: {len(failing)} matri{'x' if one else 'ces'}"
                f" fail{'s' if one else ''} the policy ({', '.join(self.fail_on)}): {names}."
                + notes)

    def _origin(self) -> str:
        """``3 file(s)``, ``model <Net>`` or ``a state_dict`` (what the sources were)."""
        parts = [f"model {s['path'][len('<model '):-1]}" if s["kind"] == "model"
                 else "a state_dict" for s in self.sources if s["kind"] in ("model", "state_dict")]
        files = sum(len(s["files"]) for s in self.sources)
        if files or not parts:
            parts.insert(0, f"{files} file(s)")
        return " and ".join(parts)

    @property
    def notes(self) -> list[str]:
        """Sentences the sources added (e.g. which format a mixed folder was read in), the
        planner's (fused projections not split), then those of the attention-logit pass (e.g.
        why it was skipped)."""
        return ([n for s in self.sources for n in s.get("notes", ())] + list(self.plan_notes)
                + list(self.logit_notes))

    def to_json_dict(self) -> dict:
        """The documented JSON report (schema ``SCHEMA_VERSION``); contains no NaN/Inf."""
        failing = self.failing
        return {
            "schema_version": SCHEMA_VERSION,
            "sources": self.sources,
            "thresholds": {"source": self.thresholds_source, **self.thresholds.to_dict()},
            "matrices": [m.to_json_dict() for m in self.matrices],
            "skipped": [s.to_json_dict() for s in self.skipped],
            "summary": {
                "tool": f"spectral_guard {__version__}",
                "mode": self.mode,
                "alpha_estimator": self.alpha_estimator,
                "limit": self.limit,
                "seed": self.seed,
                "include": list(self.include),
                "exclude": list(self.exclude),
                "matrices": len(self.matrices),
                "skipped": len(self.skipped),
                "filtered_out": self.filtered_out,
                "status_counts": self.status_counts(),
                "bytes_read": self.bytes_read,
                "elapsed_s": round(self.elapsed_s, 3),
                "logit_pairs": self.logit_pairs,
                "logit_notes": list(self.logit_notes),
                "plan_notes": list(self.plan_notes),
            },
            "verdict": {
                "healthy": not failing,
                "exit_code": self.exit_code,
                "fail_on": list(self.fail_on),
                "failing": [m.name for m in failing],
                "text": self.verdict_text(),
            },
        }
