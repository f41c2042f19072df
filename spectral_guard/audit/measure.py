"""Measuring planned matrices: one streaming pass per tensor (hygiene scan + biopsy), then the
decompositions, batched.

Rows are read in chunks of about 16 MiB (4 MiB in biopsy mode; zero-copy views of the file
mapping, :class:`~spectral_guard.checkpoint.TensorStream`); each chunk is scanned once
(:class:`~spectral_guard.audit.scan.Scan`) and in biopsy mode the seeded sample rows
(:func:`audit_biopsy_indices`) are copied out of the same chunk, so the checkpoint is read
exactly once. The sample's columns are selected from those rows and the biopsy (at most
``limit x 0.75 limit``) is decomposed. Exact mode reads the whole matrix and decomposes it
(float32, or float64 for F64 storage). A tensor on an accelerator is scanned on its device;
only its biopsy (biopsy mode) or its singular values (exact mode) come to the CPU.

:func:`measure_matrices` is the public entry: a source in, measured (not yet judged)
:class:`~spectral_guard.audit.report.MatrixResult` objects out; the audit and calibration both
measure through it. Duplicate rows are counted on the biopsy submatrix in both modes; the
row-normalized stable rank (:mod:`spectral_guard.audit.rows`) on the measured matrix (the biopsy,
or the whole matrix in exact mode), like every spectral value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import (
    DTYPES,
    Checkpoint,
    ShardHandles,
    TensorStream,
    chunk_rows,
    iter_row_chunks,
    open_checkpoint,
)
from ..checkpoint.inmemory import open_in_memory
from ..estimators import (
    batched_singular_values,
    biopsy_indices,
    intra_op_threads,
    name_seed,
    singular_values_at,
    spectral_metrics,
    spectral_metrics_batched,
)
from ..sensors import (
    ALPHA_ESTIMATORS,
    SpectralMetrics,
    as_compute_tensor,
    duplicate_rows,
    duplicate_rows_batched,
    metrics_from_singular_values,
    metrics_from_singular_values_batched,
    rank_rtol,
)
from .plan import (
    CONFIG_EXPERT_KEYS,
    FUSED_READ_AS,
    CheckpointPlan,
    TensorPlan,
    compile_patterns,
    config_value,
    plan_checkpoint,
    source_config,
    source_heads,
)
from .report import MatrixResult
from .rows import row_stable_rank
from .scan import Scan

Progress = Callable[[int, int, str], None]
"""``progress(bytes_done, bytes_total, tensor_name)``, called after each tensor."""

MODES = ("biopsy", "exact")
DUPLICATE_COS = 0.999
"""Rows with cosine similarity at least this are near-duplicates."""

BIOPSY_CHUNK = 4 * 1024 * 1024
"""Bytes per row chunk in biopsy mode: a 4 MiB chunk and its scratch bit patterns stay in the
caches between the ``bitwise_and`` and the ``amax`` (about 10% faster than 16 MiB on the scan
alone; within the noise of whole audits)."""
EXACT_CHUNK = 16 * 1024 * 1024
"""Bytes per row chunk in exact mode."""

BIOPSY_ASPECT = 0.75
"""Short side / long side of the biopsy of a matrix larger than ``limit``."""

SMALL_SVD = 1024
"""Biopsy mode decomposes matrices with both sides ``<= SMALL_SVD`` through the float64 Gram
matrix, on one thread: LAPACK threading gains nothing at biopsy sizes and, on a machine whose
cores are busy, a multi-threaded 512 x 384 SVD was measured 35x slower (2.9 s vs 0.08 s)."""

BIOPSY_WORKERS = 2
"""Threads that decompose biopsies concurrently (one per core of a 2-core box)."""

BIOPSY_BATCH = 256
"""Biopsy mode scans this many tensors, then decomposes their biopsies (bounds memory)."""


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


@dataclass
class _Measured:
    scan: Scan
    matrix: torch.Tensor  # the biopsy (biopsy mode) or the whole matrix (exact mode)
    biopsy: torch.Tensor  # the biopsy submatrix (for duplicate rows)


def _span(index: torch.Tensor | None) -> tuple[int, int] | None:
    """``(first, stop)`` when sorted ``index`` is one contiguous range (a view, no copy)."""
    if index is None or not len(index):
        return None
    lo, hi = int(index[0]), int(index[-1]) + 1
    return (lo, hi) if hi - lo == len(index) else None


class _Matrix:
    """One planned matrix being read: its rows and columns of the lead's ``rows x cols`` matrix
    (sorted indices, ``None``: all), its scan and what is kept of it."""

    def __init__(self, plan: TensorPlan, i: int, mode: str,
                 rows_idx: torch.Tensor | None, cols_idx: torch.Tensor | None) -> None:
        self.row_index, self.col_index = plan.rows_of(i), plan.cols_of(i)
        self.row_span, self.col_span = _span(self.row_index), _span(self.col_index)
        self.shape = plan.shape_of(i)
        self.mode, self.rows_idx, self.cols_idx = mode, rows_idx, cols_idx
        self.scan = Scan(self.shape[1])
        self.kept: list[torch.Tensor] = []
        self.dev_cols: torch.Tensor | None = None

    def _own(self, start: int, block: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """``(first own row, own block)`` of a chunk of the lead's rows; ``None``: none."""
        if self.row_index is not None:
            lo = int(torch.searchsorted(self.row_index, start))
            hi = int(torch.searchsorted(self.row_index, start + block.shape[0]))
            if hi == lo:
                return None
            if self.row_span is not None:
                block = block.narrow(0, int(self.row_index[lo]) - start, hi - lo)
            else:
                block = block.index_select(0, (self.row_index[lo:hi] - start).to(block.device))
            start = lo
        if self.col_span is not None:
            block = block.narrow(1, self.col_span[0], self.col_span[1] - self.col_span[0])
        elif self.col_index is not None:
            block = block.index_select(1, self.col_index.to(block.device))
        return start, block

    def update(self, start: int, chunk: torch.Tensor) -> None:
        own = self._own(start, chunk)
        if own is None:
            return
        start, block = own
        self.scan.update(block)
        if self.mode == "exact" or self.rows_idx is None:
            self.kept.append(block)
            return
        # the biopsy's cells of this chunk: its rows, then its columns (small copies)
        if self.dev_cols is None and self.cols_idx is not None:
            self.dev_cols = self.cols_idx.to(block.device)
        lo = int(torch.searchsorted(self.rows_idx, start))
        hi = int(torch.searchsorted(self.rows_idx, start + block.shape[0]))
        if hi > lo:
            rows = block.index_select(0, (self.rows_idx[lo:hi] - start).to(block.device))
            self.kept.append(rows if self.dev_cols is None else rows.index_select(1, self.dev_cols))

    def done(self) -> _Measured:
        kept = self.kept
        matrix = kept[0] if len(kept) == 1 else torch.cat(kept)
        if self.mode != "exact" or self.rows_idx is None:  # the biopsy, or measured whole
            matrix = matrix.cpu() if self.mode != "exact" else matrix
            return _Measured(self.scan, matrix, matrix.cpu())
        sub = matrix.index_select(0, self.rows_idx.to(matrix.device))
        if self.cols_idx is not None:
            sub = sub.index_select(1, self.cols_idx.to(matrix.device))
        return _Measured(self.scan, matrix, sub.cpu())


def _measure(stream: TensorStream, plan: TensorPlan, lead: tuple[int, ...],
             matrices: list[_Matrix]) -> list[_Measured]:
    """Read the lead's matrix once in row chunks; each planned matrix in it (all of it, or the
    rows/columns of a fused block) scans its part and keeps its biopsy (biopsy mode) or
    everything (exact mode)."""
    itemsize = DTYPES[plan.info.dtype].bits / 8
    mode = matrices[0].mode
    chunk = chunk_rows(plan.cols, itemsize, BIOPSY_CHUNK if mode == "biopsy" else EXACT_CHUNK)
    for start, block in iter_row_chunks(stream, lead, plan.rows, plan.cols, chunk):
        for m in matrices:
            m.update(start, block)
    return [m.done() for m in matrices]


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


def accelerator_metrics(M: torch.Tensor, alpha: str = "csn") -> list[SpectralMetrics]:
    """Exact metrics of a finite ``(m, n)`` matrix or ``(b, m, n)`` stack: the SVD runs where
    the tensor is (an accelerator) and only the singular values come to the CPU; the rest is
    :func:`~spectral_guard.sensors.metrics_from_singular_values`, as on the CPU path.
    ``alpha`` names the estimator (:data:`~spectral_guard.sensors.ALPHA_ESTIMATORS`)."""
    s = batched_singular_values(M).cpu()
    shape = (int(M.shape[-2]), int(M.shape[-1]))
    rtol = rank_rtol(shape, M.dtype)
    return [metrics_from_singular_values(si, shape, rtol, alpha=alpha)
            for si in s.reshape(-1, s.shape[-1])]


def _read_tensor(plan: TensorPlan, mode: str, limit: int, seed: int,
                 handles: ShardHandles | None = None
                 ) -> tuple[list[MatrixResult], list[_Measured]]:
    """The streaming pass over one tensor: hygiene counts and the matrices to decompose (the
    matrices sharing a lead, e.g. a fused projection's q, k and v blocks, in one read)."""
    info = plan.info
    tensor_seed = name_seed(seed, info.name)
    by_lead: dict[tuple[int, ...], list[int]] = {}
    for i, lead in enumerate(plan.leads):
        by_lead.setdefault(lead, []).append(i)
    measured: list[_Measured | None] = [None] * len(plan.names)
    with TensorStream(info, handles) as stream:
        for lead, idx in by_lead.items():
            matrices = [_Matrix(plan, i, mode,
                                *audit_biopsy_indices(plan.shape_of(i), limit, tensor_seed))
                        for i in idx]
            for i, meas in zip(idx, _measure(stream, plan, lead, matrices), strict=True):
                measured[i] = meas
    results = [MatrixResult(
        name=name, tensor=info.name, file=str(info.file), shape=plan.shape_of(i),
        tensor_shape=info.shape, dtype=info.dtype, group=None, mode=mode,
        measured_shape=tuple(meas.matrix.shape), read_as=read_as)
        for i, (name, read_as, meas) in enumerate(zip(plan.names, plan.read_as, measured,
                                                      strict=True))]
    return results, measured


def _metrics(ms: list[torch.Tensor], mode: str, alpha: str) -> list[SpectralMetrics]:
    """Metrics of one finite matrix, or of a stack of same-shape matrices (batched)."""
    if ms[0].device.type != "cpu":  # exact, on an accelerator
        return accelerator_metrics(torch.stack(ms), alpha)
    if len(ms) > 1:
        return spectral_metrics_batched(torch.stack(ms), mode="exact", alpha=alpha)
    M = ms[0]
    if mode == "biopsy":
        rtol = rank_rtol(tuple(M.shape), M.dtype)
        return [metrics_from_singular_values(_singular_values(as_compute_tensor(M)),
                                             tuple(M.shape), rtol, alpha=alpha)]
    # same singular values; LAPACK was measured 4x slower on a wide 2048 x 5632 matrix than on
    # its transpose (3.4 s vs 0.8 s)
    return [spectral_metrics(M.T if M.shape[0] < M.shape[1] else M, mode="exact", alpha=alpha)]


def _one_by_one(results: list[MatrixResult], measured: list[_Measured]) -> bool:
    """Is each of this tensor's matrices decomposed on its own (one matrix, or a fused
    projection's blocks, as separate projections would be), not as one stack of experts?"""
    return len(measured) == 1 or results[0].read_as in FUSED_READ_AS


def _decompose(results: list[MatrixResult], measured: list[_Measured], mode: str,
               alpha: str, row_sr_below: float = math.inf) -> list[MatrixResult]:
    """Decompose one tensor's measured matrices (batched for a stack of experts; a fused
    projection's blocks one by one, as separate projections would be) and fill the results."""
    small = max(measured[0].matrix.shape) <= SMALL_SVD
    with intra_op_threads(1 if small else None):
        finite = [i for i, m in enumerate(measured) if m.scan.nonfinite == 0]
        metrics: list[SpectralMetrics | None] = [None] * len(measured)
        alone = _one_by_one(results, measured)
        for idx in [[i] for i in finite] if alone else [finite] if finite else []:
            for i, met in zip(idx, _metrics([measured[i].matrix for i in idx], mode, alpha),
                              strict=True):
                metrics[i] = met
        for res, meas, met in zip(results, measured, metrics, strict=True):
            dups = None if met is None else duplicate_rows(meas.biopsy, DUPLICATE_COS)
            _fill(res, meas.scan, met, meas.matrix, meas.biopsy, dups, row_sr_below)
    return results


def _stackable(results: list[MatrixResult], measured: list[_Measured]) -> bool:
    """Biopsy mode: are this tensor's matrices decomposed in stacks with other tensors' (one
    matrix, or a fused projection's blocks; biopsy-size; 8/16/32-bit storage)? Exactly the
    matrices :func:`_metrics` sends through the float64 Gram path one by one."""
    return _one_by_one(results, measured) and all(
        max(m.matrix.shape) <= SMALL_SVD and m.matrix.dtype != torch.float64
        and m.matrix.device.type == "cpu" for m in measured)


Pending = list[tuple[MatrixResult, _Measured]]
"""Same-shape, same-dtype finite biopsies waiting for one stacked decomposition."""


def _decompose_stack(pending: Pending, alpha: str, row_sr_below: float) -> None:
    """Fill the results of same-shape finite biopsies from one stacked decomposition: the
    float64 Gram eigenvalues, the sensors and the duplicate-row counts vectorized over the
    stack (the values :func:`_decompose` gives one by one, up to the rounding of batched
    products)."""
    matrices = [as_compute_tensor(meas.matrix) for _, meas in pending]
    stack = torch.stack(matrices)
    shape = (int(stack.shape[-2]), int(stack.shape[-1]))
    # NB: the thread count is per thread (a worker's BLAS would otherwise use every core);
    # one Gram product and eigvalsh per matrix (as fast as batched here): a batched product
    # rounds by the batch, and a matrix's values must not depend on its neighbours
    with intra_op_threads(1):
        s = torch.stack([_singular_values(M) for M in matrices])
        rtol = rank_rtol(shape, pending[0][1].matrix.dtype)
        metrics = metrics_from_singular_values_batched(s, shape, rtol, alpha=alpha)
        dups = duplicate_rows_batched(stack, DUPLICATE_COS)
    for (res, meas), met, dup in zip(pending, metrics, dups, strict=True):
        _fill(res, meas.scan, met, meas.matrix, meas.biopsy, dup, row_sr_below)


def _decompose_biopsies(reads: list[tuple[list[MatrixResult], list[_Measured]]], alpha: str,
                        row_sr_below: float, pool: ThreadPoolExecutor) -> None:
    """Fill every result of a batch of biopsy-mode reads, on ``pool``'s single-threaded
    workers: the stackable biopsies (:func:`_stackable`, most of a model) grouped by shape and
    dtype, each group split in one stack per worker; the rest tensor by tensor."""
    groups: dict[tuple, Pending] = {}
    alone: list[tuple[list[MatrixResult], list[_Measured]]] = []
    for results, measured in reads:
        if not _stackable(results, measured):
            alone.append((results, measured))
            continue
        for res, meas in zip(results, measured, strict=True):
            if meas.scan.nonfinite:
                _fill(res, meas.scan, None, meas.matrix, meas.biopsy, None, row_sr_below)
            else:
                key = (tuple(meas.matrix.shape), meas.matrix.dtype)
                groups.setdefault(key, []).append((res, meas))
    stacks = [items[i::BIOPSY_WORKERS] for items in groups.values()
              for i in range(min(BIOPSY_WORKERS, len(items)))]
    # each task sets its own worker's thread count (intra_op_threads(1))
    futures = [pool.submit(_decompose_stack, p, alpha, row_sr_below) for p in stacks]
    futures += [pool.submit(_decompose, *r, "biopsy", alpha, row_sr_below) for r in alone]
    for future in futures:
        future.result()


def _fill(result: MatrixResult, scan: Scan, metrics: SpectralMetrics | None,
          matrix: torch.Tensor, biopsy: torch.Tensor, duplicates: int | None,
          row_sr_below: float = math.inf) -> None:
    result.nan, result.inf = scan.nan, scan.inf
    result.nonfinite = scan.nonfinite
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
        # NB: the row-normalized stable rank only decides a verdict under a stable-rank floor
        # (verdict.py); above ``row_sr_below`` it is not measured (one eigenvalue problem less)
        if metrics.stable_rank < row_sr_below:
            result.row_stable_rank = row_stable_rank(matrix)
        result.alpha = metrics.alpha if math.isfinite(metrics.alpha) else None
        result.duplicate_sample = int(biopsy.shape[0])
        result.duplicate_rows = duplicates


def measure_plan(plan: CheckpointPlan, *, mode: str = "biopsy", limit: int = 128, seed: int = 0,
                 progress: Progress | None = None, alpha: str = "csn",
                 row_sr_below: float = math.inf) -> list[MatrixResult]:
    """Measure every planned matrix, in plan order (statuses not judged yet: ``"ok"``);
    ``alpha`` names the HT-SR estimator (:data:`~spectral_guard.sensors.ALPHA_ESTIMATORS`);
    ``row_stable_rank`` is measured for matrices whose stable rank is under ``row_sr_below``
    (the largest stable-rank floor of the thresholds in use: where it can decide)."""
    total = plan.nbytes
    done = 0
    results: list[MatrixResult] = []
    if mode == "biopsy":
        # the main thread reads and scans the tensors in order with torch's intra-op threads
        # (the scan is bound by page faults and memory: both cores work on one tensor's
        # pages); every BIOPSY_BATCH tensors, the collected biopsies are decomposed by
        # BIOPSY_WORKERS single-threaded workers, one stack of same-shape biopsies per worker
        # (_decompose_biopsies). Overlapping the two phases was slower:
        # a decomposing thread competes with the scan's OpenMP team for the cores.
        todo = list(plan.plans)
        with ShardHandles() as handles, ThreadPoolExecutor(BIOPSY_WORKERS) as pool:
            while todo:
                batch, todo = todo[:BIOPSY_BATCH], todo[BIOPSY_BATCH:]
                reads = [_read_tensor(p, mode, limit, seed, handles) for p in batch]
                _decompose_biopsies(reads, alpha, row_sr_below, pool)
                for p, (res, _) in zip(batch, reads, strict=True):
                    results.extend(res)
                    done += p.info.nbytes
                    if progress is not None:
                        progress(done, total, p.info.name)
    else:
        for p in plan.plans:
            results.extend(_decompose(*_read_tensor(p, mode, limit, seed), mode, alpha,
                                      row_sr_below))
            done += p.info.nbytes
            if progress is not None:
                progress(done, total, p.info.name)
    return results


def open_source(source: str | Path | Sequence[str | Path] | torch.nn.Module | Mapping,
                dtensor: str = "full") -> Checkpoint:
    """A checkpoint over files, a folder, an index, a list of those, a model or a state_dict."""
    if dtensor not in ("full", "local"):
        raise ValueError(f"dtensor={dtensor!r}: use 'full' or 'local'")
    if isinstance(source, (list, tuple)) and any(
            isinstance(p, (torch.nn.Module, Mapping)) for p in source):
        raise ValueError("pass one model or state_dict at a time (lists are for paths)")
    if isinstance(source, (torch.nn.Module, Mapping)):
        return open_in_memory(source, dtensor)
    return open_checkpoint(source)


def check_options(mode: str, limit: int, alpha: str = "csn") -> None:
    """``ValueError`` (one neutral line) for an unknown mode or alpha estimator, or a limit
    below 2."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'biopsy' or 'exact'")
    if alpha not in ALPHA_ESTIMATORS:
        raise ValueError(f"unknown alpha estimator {alpha!r}: use one of "
                         f"{', '.join(ALPHA_ESTIMATORS)}")
    if int(limit) < 2:
        raise ValueError(f"the biopsy limit must be at least 2, got {limit}")


def measure_matrices(source: str | Path | Sequence[str | Path] | torch.nn.Module | Mapping, *,
                     mode: str = "biopsy", limit: int = 128, seed: int = 0,
                     include: Sequence[str] = (), exclude: Sequence[str] = (),
                     n_experts: int | None = None, dtensor: str = "full",
                     progress: Progress | None = None, alpha: str = "csn"
                     ) -> list[MatrixResult]:
    """The audit's measurements of every matrix of ``source``, without a verdict.

    ``source``: what :func:`~spectral_guard.audit.audit` takes (files, folders, indexes, an
    ``nn.Module`` or a state_dict). Each tensor is planned
    (:func:`~spectral_guard.audit.plan.plan_tensor`: linear, embedding, conv, experts, fused
    q/k/v blocks) and
    measured exactly as the audit measures it (same biopsy for the same ``mode``/``limit``/
    ``seed``, same hygiene counts), so thresholds learned on these values judge the audit's
    values. ``n_experts``: the expert count, when the source has no ``config.json`` saying it.
    Statuses are left ``"ok"`` and ``group`` ``None``: judge with
    :func:`~spectral_guard.audit.judge_results`. No attention-logit pass. ``alpha``: as for
    :func:`~spectral_guard.audit.audit`. Raises like :func:`~spectral_guard.audit.audit`.
    """
    check_options(mode, limit, alpha)
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    with torch.no_grad():
        ckpt = open_source(source, dtensor)
        config = source_config(ckpt, source)[0]
        if n_experts is None:
            n_experts = config_value(config, CONFIG_EXPERT_KEYS)
        plan = plan_checkpoint(ckpt, inc, exc, n_experts, source_heads(source, config))
        return measure_plan(plan, mode=mode, limit=int(limit), seed=int(seed),
                            progress=progress, alpha=alpha)
