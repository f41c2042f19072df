"""Checkpoint audit: checkpoint -> sensors -> verdict -> :class:`Report` (no printing).

Sources: safetensors files (the fast path), PyTorch zip checkpoints
(:mod:`~spectral_guard.torchfile`), and models or state_dicts in memory
(:mod:`~spectral_guard.inmemory`); every tensor is streamed the same way. A tensor on an
accelerator is scanned on its device; only its biopsy (biopsy mode) or its singular values
(exact mode) come to the CPU.

One streaming pass per matrix. Rows are read in chunks of about 16 MiB (4 MiB in biopsy mode;
zero-copy views of the file mapping, :class:`~spectral_guard.checkpoint.TensorStream`); each
chunk is scanned
once for NaN/Inf and all-zero rows/columns (on the IEEE bit patterns:
``|x|`` bits ``>= exponent mask`` is non-finite, ``== 0`` is zero), and in biopsy mode the
seeded sample rows (:func:`audit_biopsy_indices`) are copied out of the same chunk, so the
checkpoint is read exactly once. The sample's columns are selected from those rows and the
biopsy (at most ``limit x 0.75 limit``) is decomposed. Exact mode reads the whole tensor
and decomposes it (float32, or float64 for F64 storage).

How tensors become matrices (``shape`` in the report is the audited 2-D shape):

* 2-D ``(m, n)``: one matrix.
* 3-D ``(E, m, n)`` with ``n > 7``: a stack of ``E`` matrices named ``name[e]`` (stacked
  experts), decomposed in one batched SVD; in biopsy mode they share one set of indices.
* 3-D ``(out, in, k)`` with ``k <= 7`` (a conv1d kernel) and 4-D or more
  ``(out, in, kh, kw, ...)`` (conv kernels): one matrix ``(out, in * k * ...)``.
* 0-D, 1-D, empty, integer, bool, complex and packed sub-byte (F4, F6, F8_E8M0) tensors are
  listed in ``skipped`` with the reason.

Duplicate rows are counted on the biopsy submatrix in both modes (``O(limit^2 * limit)``).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoint import (
    DTYPES,
    Checkpoint,
    CheckpointError,
    ShardHandles,
    TensorInfo,
    TensorStream,
    chunk_rows,
    iter_row_chunks,
    natural_key,
    open_checkpoint,
)
from .checkpoint.inmemory import open_in_memory
from .estimators import (
    batched_singular_values,
    biopsy_indices,
    intra_op_threads,
    name_seed,
    singular_values_at,
    spectral_metrics,
    spectral_metrics_batched,
)
from .sensors import (
    SpectralMetrics,
    as_compute_tensor,
    duplicate_rows,
    metrics_from_singular_values,
    rank_rtol,
)
from .thresholds import Thresholds, load_thresholds
from .verdict import DEFAULT_FAIL_ON, STATUSES, Observation, judge, severity

SCHEMA_VERSION = 1
"""Version of the JSON report (``Report.to_json_dict``); bumped on incompatible changes."""

CONV1D_MAX_KERNEL = 7
DUPLICATE_COS = 0.999

Progress = Callable[[int, int, str], None]
"""``progress(bytes_done, bytes_total, tensor_name)``, called after each tensor."""


# ----------------------------------------------------------------------------------------------
# Report objects


def _num(x: float | None) -> float | None:
    """JSON-safe number: ``None`` for missing, NaN or infinite values."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class MatrixResult:
    """One audited matrix. Spectral values are those of the measured matrix (the biopsy in
    biopsy mode, see ``measured_shape``) and ``None`` when the matrix has non-finite entries."""

    name: str
    tensor: str
    file: str
    shape: tuple[int, int]
    tensor_shape: tuple[int, ...]
    dtype: str
    group: str | None
    mode: str
    measured_shape: tuple[int, int]
    status: str = "ok"
    reasons: list[str] = field(default_factory=list)
    stable_rank: float | None = None
    stable_rank_ratio: float | None = None
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

    def to_json_dict(self) -> dict:
        d = asdict(self)
        for key in ("shape", "tensor_shape", "measured_shape"):
            d[key] = list(d[key])
        for key in ("stable_rank", "stable_rank_ratio", "condition_number", "sigma_max",
                    "sigma_min", "frobenius", "effective_rank", "effective_rank_ratio", "alpha",
                    "logit_scale"):
            d[key] = _num(d[key])
        if d["logit_head_scales"] is not None:
            d["logit_head_scales"] = [_num(x) for x in d["logit_head_scales"]]
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
    """The result of :func:`audit`; the CLI renders it, :meth:`to_json_dict` serializes it."""

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
        """Sentences the sources added (e.g. which format a mixed folder was read in), then those
        of the attention-logit pass (e.g. why it was skipped)."""
        return [n for s in self.sources for n in s.get("notes", ())] + list(self.logit_notes)

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
            },
            "verdict": {
                "healthy": not failing,
                "exit_code": self.exit_code,
                "fail_on": list(self.fail_on),
                "failing": [m.name for m in failing],
                "text": self.verdict_text(),
            },
        }


# ----------------------------------------------------------------------------------------------
# Tensor -> matrices


@dataclass(frozen=True)
class _Plan:
    """How one tensor is audited: ``lead`` indices select a stacked matrix of ``rows x cols``."""

    info: TensorInfo
    names: tuple[str, ...]
    leads: tuple[tuple[int, ...], ...]
    rows: int
    cols: int


def plan_tensor(info: TensorInfo) -> _Plan | str:
    """The matrices a tensor is audited as, or the reason it is skipped (see module doc)."""
    if info.skip is not None:
        return info.skip
    dt = DTYPES.get(info.dtype)
    if dt is None:
        return f"dtype {info.dtype}: only real floating-point tensors are audited"
    if dt.kind != "float":
        what = {"int": "integer", "bool": "boolean", "complex": "complex",
                "packed": "packed low-bit"}[dt.kind]
        return f"{what} dtype {info.dtype}: only real floating-point tensors are audited"
    if dt.torch_dtype is None:
        return f"dtype {info.dtype} is not supported by this torch version"
    shape = info.shape
    if len(shape) < 2:
        return "scalar (0-D)" if not shape else "1-D vector (bias, norm or scale): not a matrix"
    if info.numel == 0:
        return "empty tensor"
    if len(shape) == 2:
        return _Plan(info, (info.name,), ((),), shape[0], shape[1])
    if len(shape) == 3 and shape[2] > CONV1D_MAX_KERNEL:
        names = tuple(f"{info.name}[{e}]" for e in range(shape[0]))
        return _Plan(info, names, tuple((e,) for e in range(shape[0])), shape[1], shape[2])
    return _Plan(info, (info.name,), ((),), shape[0], math.prod(shape[1:]))


# ----------------------------------------------------------------------------------------------
# One streaming pass

_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


_LOCAL = threading.local()


def _scratch(dtype: torch.dtype, shape: torch.Size,
             device: torch.device | None = None) -> torch.Tensor:
    """A reusable per-thread buffer (per device) for the bit patterns of one chunk: allocating
    (and page-faulting) a fresh 16 MiB tensor per chunk cost about as much as the scan itself."""
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {}
    n = math.prod(shape)
    key = (dtype, device or torch.device("cpu"))
    buf = pool.get(key)
    if buf is None or buf.numel() < n:
        buf = pool[key] = torch.empty(n, dtype=dtype, device=key[1])
    return buf[:n].view(shape)


@dataclass
class _Scan:
    """Running NaN/Inf and all-zero counts over row chunks of one ``rows x cols`` matrix.

    Works on ``|x|``'s bit pattern: zero iff the bits are 0, non-finite iff they are at least
    the exponent mask; so one integer max per row and per column answers both questions.
    """

    cols: int
    nan: int = 0
    inf: int = 0
    dead_rows: int = 0
    dead_col_candidates: torch.Tensor | None = None

    def update(self, block: torch.Tensor) -> None:
        if block.dtype not in _BITS:  # float8: small, upcasting is exact
            block = block.to(torch.float32)
        int_dtype, mask, inf_bits = _BITS[block.dtype]
        bits = torch.bitwise_and(block.contiguous().view(int_dtype), mask,
                                 out=_scratch(int_dtype, block.shape, block.device))
        row_max = bits.amax(1)
        self.dead_rows += int((row_max == 0).sum())
        # all-zero columns: candidates are the zero entries of the matrix's first row (an
        # all-zero column is zero there too); every chunk then looks at the surviving
        # candidates only (usually none), not at every column: a full column reduction of
        # each tensor's first chunk cost about as much as the row reduction
        cand = self.dead_col_candidates
        if cand is None:
            cand = torch.nonzero(bits[0] == 0).flatten()
        if cand.numel():
            cand = cand[bits.index_select(1, cand).amax(0) == 0]
        self.dead_col_candidates = cand
        if bool((row_max >= inf_bits).any()):
            self.nan += int(torch.isnan(block).sum())
            self.inf += int(torch.isinf(block).sum())

    @property
    def dead_cols(self) -> int:
        cand = self.dead_col_candidates
        return 0 if cand is None else int(cand.numel())


BIOPSY_CHUNK = 4 * 1024 * 1024
"""Bytes per row chunk in biopsy mode: a 4 MiB chunk and its scratch bit patterns stay in the
caches between the ``bitwise_and`` and the ``amax`` (about 10% faster than 16 MiB on the scan
alone; within the noise of whole audits)."""
EXACT_CHUNK = 16 * 1024 * 1024
"""Bytes per row chunk in exact mode."""


@dataclass
class _Measured:
    scan: _Scan
    matrix: torch.Tensor  # the biopsy (biopsy mode) or the whole matrix (exact mode)
    biopsy: torch.Tensor  # the biopsy submatrix (for duplicate rows)


def _measure(stream: TensorStream, plan: _Plan, lead: tuple[int, ...], mode: str,
             rows_idx: torch.Tensor | None, cols_idx: torch.Tensor | None) -> _Measured:
    """Scan one matrix in row chunks; keep the biopsy rows (biopsy) or everything (exact)."""
    itemsize = DTYPES[plan.info.dtype].bits / 8
    scan = _Scan(plan.cols)
    kept: list[torch.Tensor] = []
    chunk = chunk_rows(plan.cols, itemsize, BIOPSY_CHUNK if mode == "biopsy" else EXACT_CHUNK)
    device: torch.device | None = None
    dev_cols: torch.Tensor | None = None
    for start, block in iter_row_chunks(stream, lead, plan.rows, plan.cols, chunk):
        if device is None:  # the tensor's device: indices go there, only the biopsy leaves it
            device = block.device
            dev_cols = None if cols_idx is None else cols_idx.to(device)
        scan.update(block)
        if mode == "exact" or rows_idx is None:
            kept.append(block)
        else:  # the biopsy's cells of this chunk: its rows, then its columns (small copies)
            lo = int(torch.searchsorted(rows_idx, start))
            hi = int(torch.searchsorted(rows_idx, start + block.shape[0]))
            if hi > lo:
                rows = block.index_select(0, (rows_idx[lo:hi] - start).to(device))
                kept.append(rows if dev_cols is None else rows.index_select(1, dev_cols))
    matrix = kept[0] if len(kept) == 1 else torch.cat(kept)
    if mode != "exact" or rows_idx is None:  # the biopsy, or a small matrix measured whole
        matrix = matrix.cpu() if mode != "exact" else matrix
        return _Measured(scan, matrix, matrix.cpu())
    sub = matrix.index_select(0, rows_idx.to(matrix.device))
    if cols_idx is not None:
        sub = sub.index_select(1, cols_idx.to(matrix.device))
    return _Measured(scan, matrix, sub.cpu())


BIOPSY_ASPECT = 0.75
"""Short side / long side of the biopsy of a matrix larger than ``limit``."""


def audit_biopsy_indices(shape: tuple[int, int], limit: int, seed: int
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Sorted seeded row and column indices of the audit's biopsy (``None``: whole axis).

    A matrix with both sides ``<= limit`` is measured whole. Otherwise the biopsy is
    rectangular: ``limit`` along the longer axis and ``floor(0.75 * limit)`` along the shorter
    (each capped by the axis length), drawn with
    :func:`~spectral_guard.estimators.biopsy_indices` (rows with ``seed``, columns with
    ``seed + 1``). Why not square: the smallest singular value of a square random submatrix is
    heavy-tailed (``P(kappa > K) ~ 2 limit / K``), so a square biopsy of a healthy layer is
    "singular" now and then; a 4:3 biopsy has ``kappa`` concentrated near
    ``(1 + sqrt(3/4)) / (1 - sqrt(3/4)) ~ 14`` for noise-like weights.
    """
    m, n = shape
    if m <= limit and n <= limit:
        return None, None
    short = max(1, int(limit * BIOPSY_ASPECT))
    r_lim, c_lim = (limit, short) if m >= n else (short, limit)
    rows = biopsy_indices((m, 1), r_lim, seed)[0]
    cols = biopsy_indices((n, 1), c_lim, seed + 1)[0]
    return rows, cols


def _fill(result: MatrixResult, scan: _Scan, metrics: SpectralMetrics | None,
          biopsy: torch.Tensor, thresholds: Thresholds) -> None:
    result.nan, result.inf = scan.nan, scan.inf
    result.nonfinite = scan.nan + scan.inf
    result.dead_rows, result.dead_cols = scan.dead_rows, scan.dead_cols
    if result.nonfinite == 0 and metrics is not None:
        result.stable_rank = metrics.stable_rank
        result.stable_rank_ratio = metrics.stable_rank_ratio
        result.condition_number = metrics.condition_number
        result.singular = math.isinf(metrics.condition_number)
        result.sigma_max, result.sigma_min = metrics.sigma_max, metrics.sigma_min
        result.frobenius = metrics.frobenius
        result.effective_rank = metrics.effective_rank
        result.effective_rank_ratio = metrics.effective_rank_ratio
        result.alpha = metrics.alpha if math.isfinite(metrics.alpha) else None
        result.duplicate_sample = int(biopsy.shape[0])
        result.duplicate_rows = duplicate_rows(biopsy, DUPLICATE_COS)
    result.status, result.reasons = judge(_observation(result),
                                          thresholds.rule_for(result.name))


def _observation(result: MatrixResult) -> Observation:
    """What the verdict reads of a filled result (its condition number is set only when the
    matrix is finite and was decomposed)."""
    m, n = result.shape
    return Observation(
        min_dim=min(m, n), rows=m, cols=n, nonfinite=result.nonfinite,
        dead_rows=result.dead_rows, dead_cols=result.dead_cols,
        stable_rank=result.stable_rank, stable_rank_ratio=result.stable_rank_ratio,
        effective_rank_ratio=result.effective_rank_ratio,
        condition_number=result.condition_number if result.nonfinite == 0 else None,
        alpha=result.alpha, duplicate_rows=result.duplicate_rows,
        duplicate_sample=result.duplicate_sample, logit_scale=result.logit_scale)


SMALL_SVD = 1024
"""Biopsy mode decomposes matrices with both sides ``<= SMALL_SVD`` through the float64 Gram
matrix, on one thread: LAPACK threading gains nothing at biopsy sizes and, on a machine whose
cores are busy, a multi-threaded 512 x 384 SVD was measured 35x slower (2.9 s vs 0.08 s)."""


def _singular_values(M: torch.Tensor) -> torch.Tensor:
    """Descending singular values of a finite matrix.

    Biopsy-size matrices of 8/16/32-bit storage: ``sqrt(eig(G))`` of the float64 Gram matrix of
    the shorter side (``G = M^T M`` or ``M M^T``), about 1.6x cheaper than ``svdvals``; the
    relative error of ``s_i`` is about ``eps64 * (s_1 / s_i)^2``, below 1e-4 until
    ``s_1 / s_i ~ 1e6``, beyond the rank tolerance at which kappa is reported as ``inf``.
    Otherwise (F64 storage, or larger): ``torch.linalg.svdvals``.
    """
    if M.dtype == torch.float64:
        return singular_values_at(M, torch.float64, "svd")
    if max(M.shape) > SMALL_SVD:
        return singular_values_at(M, torch.float32, "svd")
    return singular_values_at(M, torch.float64, "gram")


BIOPSY_WORKERS = 2
"""Threads that decompose biopsies concurrently (one per core of a 2-core box)."""

BIOPSY_BATCH = 256
"""Biopsy mode scans this many tensors, then decomposes their biopsies (bounds memory)."""


def _read_tensor(plan: _Plan, mode: str, limit: int, seed: int, thresholds: Thresholds,
                 handles: ShardHandles | None = None
                 ) -> tuple[list[MatrixResult], list[_Measured]]:
    """The streaming pass over one tensor: hygiene counts and the matrices to decompose."""
    info = plan.info
    rows_idx, cols_idx = audit_biopsy_indices((plan.rows, plan.cols), limit,
                                              name_seed(seed, info.name))
    results: list[MatrixResult] = []
    measured: list[_Measured] = []
    with TensorStream(info, handles) as stream:
        for name, lead in zip(plan.names, plan.leads, strict=True):
            meas = _measure(stream, plan, lead, mode, rows_idx, cols_idx)
            measured.append(meas)
            results.append(MatrixResult(
                name=name, tensor=info.name, file=str(info.file), shape=(plan.rows, plan.cols),
                tensor_shape=info.shape, dtype=info.dtype, group=thresholds.group_for(name),
                mode=mode, measured_shape=tuple(meas.matrix.shape)))
    return results, measured


def _finish_tensor(results: list[MatrixResult], measured: list[_Measured], mode: str,
                   thresholds: Thresholds) -> list[MatrixResult]:
    """Decompose the measured matrices, then judge them."""
    small = max(measured[0].matrix.shape) <= SMALL_SVD
    with intra_op_threads(1 if small else None):
        return _decompose_and_judge(results, measured, mode, thresholds)


def accelerator_metrics(M: torch.Tensor) -> list[SpectralMetrics]:
    """Exact metrics of a finite ``(m, n)`` matrix or ``(b, m, n)`` stack: the SVD runs where
    the tensor is (an accelerator) and only the singular values come to the CPU; the rest is
    :func:`~spectral_guard.sensors.metrics_from_singular_values`, as on the CPU path."""
    s = batched_singular_values(M).cpu()
    shape = (int(M.shape[-2]), int(M.shape[-1]))
    rtol = rank_rtol(shape, M.dtype)
    return [metrics_from_singular_values(si, shape, rtol, alpha=True)
            for si in s.reshape(-1, s.shape[-1])]


def _decompose_and_judge(results: list[MatrixResult], measured: list[_Measured], mode: str,
                         thresholds: Thresholds) -> list[MatrixResult]:
    finite = [i for i, m in enumerate(measured) if m.scan.nan + m.scan.inf == 0]
    metrics: list[SpectralMetrics | None] = [None] * len(measured)
    if finite and measured[0].matrix.device.type != "cpu":  # exact mode on an accelerator
        stack = torch.stack([measured[i].matrix for i in finite])
        for i, met in zip(finite, accelerator_metrics(stack), strict=True):
            metrics[i] = met
    elif mode == "biopsy" and len(measured) == 1 and finite:
        M = measured[0].matrix
        rtol = rank_rtol(tuple(M.shape), M.dtype)
        metrics[0] = metrics_from_singular_values(_singular_values(as_compute_tensor(M)),
                                                  tuple(M.shape), rtol, alpha=True)
    elif len(measured) == 1 and finite:
        # same singular values; LAPACK was measured 4x slower on a wide 2048 x 5632 matrix
        # than on its transpose (3.4 s vs 0.8 s)
        M = measured[0].matrix
        metrics[0] = spectral_metrics(M.T if M.shape[0] < M.shape[1] else M, mode="exact",
                                      alpha=True)
    elif finite:
        stack = torch.stack([measured[i].matrix for i in finite])
        for i, met in zip(finite, spectral_metrics_batched(stack, mode="exact", alpha=True),
                          strict=True):
            metrics[i] = met
    for res, meas, met in zip(results, measured, metrics, strict=True):
        _fill(res, meas.scan, met, meas.biopsy, thresholds)
    return results


def _sort_key(m: MatrixResult) -> tuple:
    if m.status == "ill_conditioned":
        score = -(m.condition_number if m.condition_number is not None else math.inf)
    else:
        score = m.effective_rank_ratio if m.effective_rank_ratio is not None else -1.0
    return (severity(m.status), score, natural_key(m.name))


def _compile(patterns: Sequence[str], flag: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{flag} {p!r}: bad regular expression ({exc})") from None
    return out


def audit(path: str | Path | Sequence[str | Path] | torch.nn.Module | Mapping, *,
          mode: str = "biopsy", limit: int = 128,
          seed: int = 0, include: Sequence[str] = (), exclude: Sequence[str] = (),
          thresholds: Thresholds | str | Path | None = None,
          fail_on: Sequence[str] = DEFAULT_FAIL_ON,
          progress: Progress | None = None, dtensor: str = "full",
          heads: int | None = None) -> Report:
    """Audit every matrix of one or more checkpoints, or of a model or state_dict in memory.

    ``path``: a ``.safetensors`` file, a PyTorch checkpoint (``.pt``/``.bin``/``.pth``/
    ``.ckpt``), a ``*.safetensors.index.json`` or ``pytorch_model.bin.index.json``, a folder
    holding any of these (safetensors preferred), or a list of those; or an ``nn.Module`` (its
    ``named_parameters``, tied weights once) or a mapping of names to tensors, on any device.
    ``mode``: ``"biopsy"`` (seeded ``<= limit x limit`` submatrix per
    matrix) or ``"exact"`` (full SVD). ``include``/``exclude``: regexes searched in tensor names.
    ``thresholds``: a :class:`Thresholds`, a thresholds file, or ``None`` for the shipped
    defaults. ``dtensor``: for DTensor/FSDP2 parameters, ``"full"`` (gather each tensor; a
    collective, so call it on every rank) or ``"local"`` (this rank's shards); see
    :mod:`spectral_guard.inmemory`. ``heads``: attention heads per layer for the q-k logit
    pass (:mod:`spectral_guard.audit_logit`) on checkpoints and state_dicts; ``None`` reads
    ``config.json`` next to the checkpoint (a model uses its modules' attributes), and without
    a head count the pass is skipped with a note. Raises
    :class:`~spectral_guard.checkpoint.CheckpointError` for unreadable input,
    :class:`~spectral_guard.thresholds.ThresholdsError` for a bad thresholds file and
    ``ValueError`` for bad options (all with one-line messages).
    """
    if mode not in ("biopsy", "exact"):
        raise ValueError(f"unknown mode {mode!r}: use 'biopsy' or 'exact'")
    if int(limit) < 2:
        raise ValueError(f"--limit must be at least 2, got {limit}")
    bad = sorted(set(fail_on) - set(STATUSES))
    if bad:
        raise ValueError(f"--fail-on: unknown status {bad[0]!r} (choose from "
                         f"{', '.join(STATUSES)})")
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    if isinstance(thresholds, Thresholds):
        th, th_source = thresholds, "object"
    else:
        th = load_thresholds(thresholds)
        th_source = "default" if thresholds is None else str(thresholds)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int)
                              or heads < 1):
        raise ValueError(f"--heads must be a positive integer, got {heads!r}")
    if dtensor not in ("full", "local"):
        raise ValueError(f"dtensor={dtensor!r}: use 'full' or 'local'")
    if isinstance(path, (list, tuple)) and any(
            isinstance(p, (torch.nn.Module, Mapping)) for p in path):
        raise ValueError("pass one model or state_dict at a time (lists are for paths)")
    t0 = time.perf_counter()
    with torch.no_grad():
        ckpt: Checkpoint = (open_in_memory(path, dtensor)
                            if isinstance(path, (torch.nn.Module, Mapping))
                            else open_checkpoint(path))
        model = path if isinstance(path, torch.nn.Module) else None
        return _audit_checkpoint(ckpt, mode, int(limit), int(seed), inc, exc, th, th_source,
                                 tuple(fail_on), progress, t0, tuple(include), tuple(exclude),
                                 heads=heads, model=model)


def _audit_checkpoint(ckpt: Checkpoint, mode: str, limit: int, seed: int,
                      inc: list[re.Pattern], exc: list[re.Pattern], th: Thresholds,
                      th_source: str, fail_on: tuple[str, ...], progress: Progress | None,
                      t0: float, include: tuple[str, ...], exclude: tuple[str, ...], *,
                      heads: int | None = None, model: torch.nn.Module | None = None) -> Report:
    """The audit of validated sources (see :func:`audit`)."""
    tensors = ckpt.tensors
    selected = [t for t in tensors
                if (not inc or any(p.search(t.name) for p in inc))
                and not any(p.search(t.name) for p in exc)]
    filtered_out = len(tensors) - len(selected)
    plans: list[_Plan] = []
    skipped: list[Skipped] = []
    for t in selected:
        plan = plan_tensor(t)
        if isinstance(plan, str):
            skipped.append(Skipped(t.name, str(t.file), t.shape, t.dtype, plan))
        else:
            plans.append(plan)
    if not plans:
        where = ", ".join(str(s.path) for s in ckpt.sources)
        if not selected:
            raise CheckpointError(f"{where}: no tensor matches the --include/--exclude filters"
                                  if tensors else f"{where}: checkpoint holds no tensors")
        raise CheckpointError(f"{where}: no matrices to audit ({len(skipped)} tensor(s), all "
                              f"skipped, e.g. {skipped[0].name}: {skipped[0].reason})")
    total = sum(p.info.nbytes for p in plans)
    done = 0
    results: list[MatrixResult] = []
    if mode == "biopsy":
        # the main thread reads and scans the tensors in order with torch's intra-op threads
        # (the scan is bound by page faults and memory: both cores work on one tensor's
        # pages); every BIOPSY_BATCH tensors, the collected biopsies are decomposed and judged
        # by BIOPSY_WORKERS single-threaded workers. Overlapping the two phases was slower:
        # a decomposing thread competes with the scan's OpenMP team for the cores.
        todo = list(plans)
        with ShardHandles() as handles, ThreadPoolExecutor(BIOPSY_WORKERS) as pool:
            while todo:
                batch, todo = todo[:BIOPSY_BATCH], todo[BIOPSY_BATCH:]
                reads = [_read_tensor(p, mode, limit, seed, th, handles) for p in batch]
                with intra_op_threads(1):
                    finished = list(pool.map(lambda r: _finish_tensor(*r, mode, th), reads))
                for plan, res in zip(batch, finished, strict=True):
                    results.extend(res)
                    done += plan.info.nbytes
                    if progress is not None:
                        progress(done, total, plan.info.name)
    else:
        for plan in plans:
            read = _read_tensor(plan, mode, limit, seed, th)
            results.extend(_finish_tensor(*read, mode, th))
            done += plan.info.nbytes
            if progress is not None:
                progress(done, total, plan.info.name)
    logit_pairs, logit_notes = _logit_pass(ckpt, results, th, heads, model)
    results.sort(key=_sort_key)
    return Report(
        sources=[s.to_json_dict() for s in ckpt.sources], thresholds=th,
        thresholds_source=th_source, mode=mode, limit=limit, seed=seed,
        fail_on=fail_on, matrices=results, skipped=skipped, filtered_out=filtered_out,
        bytes_read=total, elapsed_s=time.perf_counter() - t0, include=include,
        exclude=exclude, logit_pairs=logit_pairs, logit_notes=logit_notes)


def _logit_pass(ckpt: Checkpoint, results: list[MatrixResult], th: Thresholds,
                heads: int | None, model: torch.nn.Module | None) -> tuple[int, list[str]]:
    """The attention-logit pass after the per-matrix audit (:mod:`spectral_guard.audit_logit`):
    pair the audited 2-D matrices, measure ``s_h n`` per head exactly (each weight re-read on
    its own), attach the pair's values to its matrices and judge them again. Returns the number
    of measured pairs and the notes for the report."""
    from .audit_logit import (
        PairScale,
        candidate_pairs,
        config_heads,
        geometry,
        measure_model,
        measure_named,
    )

    by_name = {r.name: r for r in results if r.name == r.tensor and len(r.tensor_shape) == 2}
    notes: list[str] = []
    scales: list[PairScale] = []
    if model is not None:
        scales, skipped_pairs = measure_model(model)
        if skipped_pairs:
            where, why = next(iter(skipped_pairs.items()))
            notes.append(f"q-k logit scale: {len(skipped_pairs)} attention candidate(s) not "
                         f"paired (e.g. {where or 'the model'}: {why}).")
    else:
        infos = {t.name: t for t in ckpt.tensors if t.name in by_name}
        shapes = {name: by_name[name].shape for name in infos}
        cands = candidate_pairs(shapes)
        kv_heads, source = None, "heads="
        if cands and heads is None:
            paths = [s.path for s in ckpt.sources if not s.in_memory]
            heads, kv_heads, cfg = config_heads(paths)
            source = str(cfg)
        if cands and heads is None:
            notes.append(f"q-k logit scale not checked: {len(cands)} attention pair(s) found "
                         "but no head count (no config.json with num_attention_heads or n_head "
                         "next to the checkpoint; pass --heads / heads=).")
            return 0, notes
        bad: list[str] = []
        for cand in cands:
            try:
                pair = geometry(cand, shapes, heads, kv_heads)
            except ValueError as exc:
                bad.append(f"{cand[0]}: {exc} ({heads} heads from {source})")
                continue

            def load(name: str) -> torch.Tensor:
                with TensorStream(infos[name]) as stream:
                    return stream.full().to("cpu", torch.float64, copy=True)

            measured = measure_named(pair, load)
            if measured is not None:
                scales.append(measured)
        if bad:
            notes.append(f"q-k logit scale: {len(bad)} attention pair(s) not measured "
                         f"(e.g. {bad[0]}).")
    scales = [sc for sc in scales if any(t in by_name for t in sc.tensors)]
    for sc in scales:
        for tensor in sc.tensors:
            res = by_name.get(tensor)
            if res is None:
                continue
            res.logit_scale, res.logit_head = sc.max_bound, sc.worst_head
            res.logit_pair, res.logit_head_scales = sc.name, list(sc.bounds)
            res.status, res.reasons = judge(_observation(res), th.rule_for(res.name))
    return len(scales), notes
