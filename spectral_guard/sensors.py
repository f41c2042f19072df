"""Spectral sensors: pure functions on one weight matrix or a batch of them.

Every function here takes tensors and returns tensors or plain numbers. Nothing reads files, keeps
state, or touches the autograd graph of its input (inputs are detached unless a function says it is
differentiable). Low-precision inputs (fp16, bf16, fp8) are upcast before any linear algebra,
because ``torch.linalg.svdvals`` does not run on them on CPU.

Notation: ``W`` is ``m x n``, ``k = min(m, n)``, ``s_1 >= ... >= s_k >= 0`` its singular values.

* spectral norm      ``s_1``
* Frobenius norm     ``||W||_F = sqrt(sum s_i^2)``
* stable rank        ``SR = ||W||_F^2 / s_1^2``           (1 <= SR <= rank(W))
* stable-rank ratio  ``SR / k``                            (ASSR paper, section 3.1)
* condition number   ``kappa = s_1 / s_k``, ``inf`` when ``s_k`` is below the rank tolerance
* effective rank     ``exp(H(p))``, ``p_i = s_i / sum s_j`` (Roy & Vetterli 2007)
* alpha              power-law exponent of the ESD (eigenvalues ``s_i^2`` of ``W^T W``):
                     MLE with ``xmin`` by minimum KS distance (Clauset, Shalizi & Newman
                     2009), as WeightWatcher computes it (:func:`powerlaw_fit`); the median
                     ``xmin`` Hill estimator (TempBalance) only on request
* Fiedler value      second-smallest eigenvalue of the normalized Laplacian of the row graph
                     with weights ``|cos(w_i, w_j)|`` (ASSR README), see :func:`fiedler_value`

See ``docs/metrics.md`` for costs, errors and references.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

Tensor = torch.Tensor

_LOW_PRECISION = {torch.float16, torch.bfloat16}


def as_compute_tensor(W: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Detached ``W`` in a dtype linalg can use (a view when no conversion is needed).

    fp16, bf16 and float8 inputs are upcast to float32 (or ``dtype``); float32/float64 stay as
    they are unless ``dtype`` asks otherwise. The input is never modified.
    """
    W = W.detach()
    if not W.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {W.dtype}")
    if dtype is not None:
        return W.to(dtype)
    if W.dtype in _LOW_PRECISION or W.element_size() == 1:
        return W.to(torch.float32)
    return W


def rank_rtol(shape: tuple[int, ...], storage_dtype: torch.dtype) -> float:
    """Relative tolerance below which a singular value counts as zero.

    ``rtol = eps * sqrt(max(m, n))`` with ``eps`` the machine epsilon of the storage dtype
    (float32's for 16- and 8-bit storage, whose rounding noise would otherwise hide every
    condition number above ~100). A singular value ``s_k <= rtol * s_1`` cannot be told apart
    from the rounding of the stored entries, so ``kappa`` is reported as ``inf``.
    """
    m, n = shape[-2], shape[-1]
    eps_dtype = storage_dtype if storage_dtype in (torch.float32, torch.float64) else torch.float32
    return torch.finfo(eps_dtype).eps * math.sqrt(max(m, n, 1))


# ----------------------------------------------------------------------------------------------
# Metrics from singular values (batched over leading dimensions)


def stable_rank_from_sv(s: Tensor) -> Tensor:
    """``SR = sum s_i^2 / s_1^2``; 0 for the zero matrix, ``nan`` for ``nan`` input.
    ``s`` sorted descending, last dim."""
    top = s[..., 0] ** 2
    total = (s**2).sum(-1)
    return torch.where(top == 0, torch.zeros_like(top), total / torch.where(top == 0, 1, top))


def effective_rank_from_sv(s: Tensor) -> Tensor:
    """Roy & Vetterli effective rank ``exp(-sum p_i log p_i)``, ``p = s / sum s``; 0 for zero,
    ``nan`` for ``nan`` input."""
    total = s.sum(-1, keepdim=True)
    p = s / torch.where(total == 0, 1, total)
    entropy = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1)), 0).sum(-1)
    entropy = torch.where(torch.isnan(total.squeeze(-1)), math.nan, entropy)
    return torch.where(total.squeeze(-1) == 0, torch.zeros_like(entropy), torch.exp(entropy))


def condition_number_from_sv(s: Tensor, rtol: float = 0.0) -> Tensor:
    """``kappa = s_1 / s_k``; ``inf`` when ``s_k <= rtol * s_1`` (singular), ``inf`` for zero."""
    top, bottom = s[..., 0], s[..., -1]
    singular = bottom <= rtol * top
    kappa = top / torch.where(singular, torch.ones_like(bottom), bottom)
    return torch.where(singular, torch.full_like(top, math.inf), kappa)


def _svdvals_or_nan(Wc: Tensor) -> Tensor:
    """``svdvals`` of a matrix (or stack); all-``nan`` for a matrix with a non-finite entry.

    LAPACK raises on NaN and returns garbage (and prints errors) on Inf, which made
    ``stable_rank`` of a matrix with an Inf read 0.0; every sensor reports ``nan`` instead.
    """
    finite = torch.isfinite(Wc).flatten(-2).all(-1)
    if bool(finite.all()):
        return torch.linalg.svdvals(Wc)
    safe = torch.where(finite[..., None, None], Wc, torch.zeros((), dtype=Wc.dtype))
    s = torch.linalg.svdvals(safe)
    return torch.where(finite[..., None], s, torch.full((), math.nan, dtype=s.dtype))


def singular_values(W: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Exact singular values (descending) by a full SVD in float32, or ``dtype`` (e.g. float64).
    All ``nan`` when ``W`` has a non-finite entry."""
    return _svdvals_or_nan(as_compute_tensor(W, dtype))


def spectral_norm(W: Tensor, dtype: torch.dtype | None = None) -> float:
    """``sigma_max = ||W||_2``."""
    return float(singular_values(W, dtype)[..., 0])


def frobenius_norm(W: Tensor, dtype: torch.dtype | None = None,
                   chunk_elements: int = 1 << 22) -> float:
    """``||W||_F = sqrt(sum_ij W_ij^2)`` (no SVD needed).

    The sum of squares is accumulated in float64 over row chunks of about ``chunk_elements``
    entries: torch's float32 norm reduction loses ~2e-4 relative on a 4096 x 1024 matrix, enough
    to bias ``SR = ||W||_F^2 / sigma_max^2`` estimated with power iteration. ``dtype`` is kept
    for symmetry with the other sensors; the accumulation is float64 either way.
    """
    Wc = as_compute_tensor(W, dtype)
    Wc = Wc.reshape(-1, Wc.shape[-1]) if Wc.dim() >= 2 else Wc.reshape(1, -1)
    rows = max(1, chunk_elements // max(Wc.shape[-1], 1))
    total = 0.0
    for start in range(0, Wc.shape[0], rows):
        block = Wc[start:start + rows].to(torch.float64)
        total += float((block * block).sum())
    return math.sqrt(total)


def stable_rank(W: Tensor, dtype: torch.dtype | None = None) -> float:
    """``SR = ||W||_F^2 / sigma_max^2``."""
    return float(stable_rank_from_sv(singular_values(W, dtype)))


def stable_rank_ratio(W: Tensor, dtype: torch.dtype | None = None) -> float:
    """``SR / min(m, n)``, in ``(0, 1]``; 1 for a matrix with orthogonal rows or columns."""
    return stable_rank(W, dtype) / max(min(W.shape[-2:]), 1)


def sigma_min(W: Tensor, dtype: torch.dtype | None = None) -> float:
    """Smallest of the ``min(m, n)`` singular values."""
    return float(singular_values(W, dtype)[..., -1])


def condition_number(W: Tensor, dtype: torch.dtype | None = None) -> float:
    """``kappa = sigma_max / sigma_min``, ``inf`` when singular to within :func:`rank_rtol`."""
    s = singular_values(W, dtype)
    return float(condition_number_from_sv(s, rank_rtol(tuple(W.shape), W.dtype)))


def effective_rank(W: Tensor, dtype: torch.dtype | None = None) -> float:
    """Roy & Vetterli effective rank, in ``[1, min(m, n)]`` (0 for the zero matrix)."""
    return float(effective_rank_from_sv(singular_values(W, dtype)))


def effective_rank_ratio(W: Tensor, dtype: torch.dtype | None = None) -> float:
    """Effective rank over ``min(m, n)``."""
    return effective_rank(W, dtype) / max(min(W.shape[-2:]), 1)


# ----------------------------------------------------------------------------------------------
# Heavy-tailed self-regularization exponent

WW_EVALS_THRESH = 1e-5
"""WeightWatcher's floor on ESD eigenvalues: it fits only ``lambda > 1e-5``, an absolute value
(so its alpha of ``c W`` changes when ``c`` pushes eigenvalues under it, and a matrix whose
squared singular values all sit below it has none). :func:`powerlaw_fit` applies it only on
request (``evals_thresh=WW_EVALS_THRESH``); by default alpha is scale-free and numerically zero
eigenvalues are left out by the relative :func:`rank_rtol` rule instead."""

SMALL_N = 20
"""Below this many eigenvalues WeightWatcher 0.7.7 switches to its small-sample fit
(:func:`_small_n_fit`); at or above it, the Clauset-Shalizi-Newman fit."""


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`powerlaw_fit`: exponent, chosen ``xmin``, its KS distance ``D``, the
    number of eigenvalues ``>= xmin`` (``n_tail``) and the number fitted (``n``)."""

    alpha: float
    xmin: float
    D: float
    n_tail: int
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def _no_fit(n: int) -> PowerLawFit:
    return PowerLawFit(math.nan, math.nan, math.nan, 0, n)


def _ks_distances(L: Tensor, alpha: Tensor, chunk_elements: int) -> Tensor:
    """``D_i = max_{j >= i} |1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / n_i|`` for every
    candidate ``i < N - 1`` of the ascending log-eigenvalues ``L`` (``n_i = N - i``): the
    one-sided KS distance of WeightWatcher's fit, ``1`` where ``alpha_i <= 1``. ``L`` is ``(N,)``
    or a ``(B, N)`` stack of ESDs of one size (``alpha`` then ``(B, N - 1)``).

    Exact and vectorized. Up to ``N = 256`` one ``(N - 1) x N`` block per ESD; above, blocks of
    about ``N / 8`` rows along the diagonal (at most ``chunk_elements`` entries per ESD), each
    ``(c, N - i0)`` wide, so the work is about ``0.56 N^2`` exponentials. Entries ``j < i`` are
    neutralized instead of masked: the exponent is clamped to ``[-40, 0]`` (``exp(-40) < eps /
    2``, so ``1 - exp(t)`` is unchanged where ``j >= i``, and ``j < i``, a positive exponent,
    gives ``exp = 1``) and the empirical step ``(j - i) / n_i`` to ``>= 0``, which makes those
    entries exactly 0. ``alpha = inf`` (a tail with no spread) gives ``1^-inf = 1`` as numpy's
    power does. Each ESD's distances are computed by the same elementwise operations whatever
    the batch, so a stacked ESD gets the values it gets alone.
    """
    batched = L.dim() == 2
    L, alpha = (L, alpha) if batched else (L[None], alpha[None])
    N = L.shape[-1]
    D = torch.ones(L.shape[0], N - 1, dtype=L.dtype)
    rows = N - 1 if N <= 256 else max(1, min(chunk_elements // N, -(-N // 8)))
    slope = 1 - alpha.clamp_max(1e300)  # inf -> finite: 0 * (1 - alpha) is 0, not nan
    # j - i for a block's row r = i - i0 and column k = j - i0 is k - r whatever i0: exact
    # integers, computed once (so a row's values do not depend on how the rows are blocked)
    offsets = (torch.arange(N, dtype=L.dtype)[None, :]
               - torch.arange(min(rows, N - 1), dtype=L.dtype)[:, None])
    minus_one = torch.tensor(-1.0, dtype=L.dtype)
    for i0 in range(0, N - 1, rows):
        i1 = min(i0 + rows, N - 1)
        s = slope[:, i0:i1, None]
        inv_n = 1.0 / (N - torch.arange(i0, i1, dtype=L.dtype))[:, None]
        t = torch.addcmul(-s * L[:, i0:i1, None], s, L[:, None, i0:]).clamp_(-40.0, 0.0)
        step = torch.addcmul(minus_one, offsets[:i1 - i0, :N - i0], inv_n).clamp_min_(-1.0)
        dist = torch.exp_(t).add_(step).abs_().amax(dim=-1)  # |1 - F_fit - F_emp|, row max
        D[:, i0:i1] = torch.where(alpha[:, i0:i1] > 1, dist, 1.0)
    return D if batched else D[0]


def _small_n_fit(x: list[float]) -> PowerLawFit:
    """WeightWatcher 0.7.7's fit for fewer than :data:`SMALL_N` eigenvalues (``x`` ascending):
    the bias-corrected MLE ``alpha = 1 + (n - 1) / sum log(x_j / xmin)`` for each candidate
    with a tail of at least 8, the smallest KS distance wins (WeightWatcher also computes a
    penalized objective, but its final pick is by ``D``); no such candidate: the whole sample
    is the tail. Where WeightWatcher returns a placeholder (a tail with no spread), ``nan``.
    """
    N = len(x)
    logs = [math.log(v) for v in x]

    def candidate(i: int) -> tuple[float, float] | None:
        n = N - i
        s = sum(logs[i:]) - n * logs[i]
        if s <= 1e-12:
            return None
        alpha = 1.0 + (n - 1.0) / s
        if alpha <= 1.0:
            return None
        D = max(abs(j / n - (1.0 - (x[i + j] / x[i]) ** (1.0 - alpha))) for j in range(n))
        return alpha, D

    best: tuple[int, float, float] | None = None
    for i in range(N - 7):
        got = candidate(i)
        if got is not None and (best is None or got[1] < best[2]):
            best = (i, *got)
    if best is None:
        got = candidate(0)
        if got is None:
            return _no_fit(N)
        best = (0, *got)
    i, alpha, D = best
    return PowerLawFit(alpha, x[i], D, N - i, N)


def powerlaw_fit(eigs: Tensor, evals_thresh: float = 0.0,
                 chunk_elements: int = 1 << 21) -> PowerLawFit:
    """The HT-SR power-law fit of an ESD, as WeightWatcher 0.7.7 computes it by default.

    Clauset, Shalizi & Newman (2009): for each candidate ``xmin`` (every fitted eigenvalue but
    the largest, ascending), the continuous MLE ``alpha = 1 + n / sum_{x >= xmin} log(x / xmin)``
    over the ``n`` eigenvalues ``>= xmin``, and the KS distance between the tail's empirical
    CDF and the fitted ``1 - (x / xmin)^(1 - alpha)``; the ``xmin`` with the smallest distance
    wins (the first on a tie). This is WeightWatcher's ``pl_package="ww"`` fit (its default;
    ``xmax=None``, ``fix_fingers=False``): the empirical CDF at the ``k``-th tail point is
    ``k / n`` (one-sided, as WeightWatcher has it) and every candidate is tried (no cap).
    Non-finite eigenvalues and those ``<= evals_thresh`` are dropped first. One deviation:
    WeightWatcher also drops ``lambda <= 1e-5`` (absolute, :data:`WW_EVALS_THRESH`), which makes
    its alpha depend on the scale of ``W``; here ``evals_thresh`` defaults to 0 (the callers
    drop numerically zero eigenvalues by the relative :func:`rank_rtol` rule), and
    ``evals_thresh=WW_EVALS_THRESH`` reproduces WeightWatcher exactly. Fewer than
    :data:`SMALL_N` eigenvalues: WeightWatcher's small-sample variant (:func:`_small_n_fit`).
    Fewer than 2: no fit (``nan``).

    Cost: ``O(N^2)`` exponentials, vectorized (:func:`_ks_distances`): measured in
    ``bench/alpha_ww.py``.
    """
    lam = eigs.detach().to(torch.float64).flatten()
    lam = torch.sort(lam[torch.isfinite(lam) & (lam > max(evals_thresh, 0.0))]).values
    N = lam.numel()
    if N < 2:
        return _no_fit(N)
    if N < SMALL_N:
        return _small_n_fit(lam.tolist())
    return powerlaw_fits(lam[None], chunk_elements)[0]


def powerlaw_fits(lam: Tensor, chunk_elements: int = 1 << 21) -> list[PowerLawFit]:
    """:func:`powerlaw_fit` of each row of a ``(B, N)`` stack of ESDs, vectorized over the stack.

    Every row must be ascending, finite and positive (already filtered as :func:`powerlaw_fit`
    filters), with ``N >= SMALL_N``. Each row's fit is computed by the same elementwise
    operations as alone, so the results equal :func:`powerlaw_fit`'s row by row.
    """
    lam = lam.to(torch.float64)
    B, N = lam.shape
    if N < SMALL_N:
        raise ValueError(f"powerlaw_fits needs at least {SMALL_N} eigenvalues per row, got {N}")
    L = torch.log(lam)
    n = N - torch.arange(N - 1, dtype=torch.float64)
    Lc = L - L[:, -1:]  # centred on the largest: exact zeros for a tail with no spread
    suffix = torch.flip(torch.cumsum(torch.flip(Lc, (1,)), 1), (1,))  # sum_{j >= i} Lc_j
    alpha = 1 + n / (suffix[:, :-1] - n * Lc[:, :-1])  # 1 + n / sum_{j >= i} log(x_j / x_i)
    D = _ks_distances(L, alpha, chunk_elements)
    best = torch.argmin(D, dim=1)
    picked = [v.tolist() for v in (alpha.gather(1, best[:, None])[:, 0], lam.gather(
        1, best[:, None])[:, 0], D.gather(1, best[:, None])[:, 0])]
    return [PowerLawFit(a, x, d, N - i, N)
            for a, x, d, i in zip(*picked, best.tolist(), strict=True)]


def powerlaw_alpha(eigs: Tensor, xmin: float | None = None) -> float:
    """Hill estimator: the power-law MLE over the eigenvalues above a *given* ``xmin``.

    For eigenvalues ``lambda_i >= xmin`` (``n_tail`` of them), the continuous power-law MLE
    (Clauset, Shalizi & Newman 2009) is ``alpha = 1 + n_tail / sum log(lambda_i / xmin)``.
    Default ``xmin`` is the median of the positive eigenvalues (the rule TempBalance uses:
    fit the upper half of the ESD). This is *not* the alpha WeightWatcher reports, which also
    chooses ``xmin`` (:func:`powerlaw_fit`); it is a different, faster estimator (one pass, no
    ``xmin`` search), typically lower on trained weights. Returns ``nan`` when fewer than 2
    eigenvalues lie in the tail or the tail is degenerate (all equal).
    """
    lam = eigs.detach().to(torch.float64).flatten()
    lam = lam[torch.isfinite(lam) & (lam > 0)]
    if lam.numel() < 2:
        return math.nan
    lam, _ = torch.sort(lam)
    if xmin is None:
        xmin = float(lam[(lam.numel() - 1) // 2])
    tail = lam[lam >= xmin]
    log_sum = float(torch.log(tail / xmin).sum())
    if tail.numel() < 2 or log_sum <= 0:
        return math.nan
    return 1.0 + tail.numel() / log_sum


def esd(W: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Empirical spectral density support: eigenvalues ``s_i^2`` of ``W^T W`` (ascending)."""
    s = _svdvals_or_nan(as_compute_tensor(W, dtype))
    return torch.flip(s**2, dims=(-1,))


def nonzero_eigenvalues_from_sv(s: Tensor, rtol: float = 0.0) -> Tensor:
    """ESD eigenvalues ``s_i^2`` of the singular values that are not numerically zero.

    ``s_i <= rtol * s_1`` is rounding noise (the :func:`rank_rtol` rule that makes ``kappa``
    infinite); such values would otherwise enter the power-law fit as tiny positive
    eigenvalues, drag the median ``xmin`` into the noise and make alpha depend on how the SVD
    happened to round (e.g. ``alpha(W) != alpha(W.T)`` for a rank-deficient ``W``).
    ``s`` is one descending vector.
    """
    s = s.detach().to(torch.float64).flatten()
    if s.numel() == 0:
        return s
    return s[s > rtol * s[0]] ** 2


def _matrix_eigenvalues(W: Tensor) -> Tensor | None:
    """Non-zero ESD eigenvalues of ``W`` from a float64 SVD (the :func:`rank_rtol` rule of its
    storage dtype); ``None`` when ``W`` has a non-finite entry."""
    Wc = as_compute_tensor(W, torch.float64)
    if not bool(torch.isfinite(Wc).all()):
        return None
    s = torch.linalg.svdvals(Wc)
    return nonzero_eigenvalues_from_sv(s, rank_rtol(tuple(W.shape), W.dtype))


def alpha_csn(W: Tensor) -> float:
    """HT-SR alpha of ``W``'s ESD: :func:`powerlaw_fit` (``xmin`` by minimum KS distance), the
    alpha WeightWatcher reports and the audit's default. ``nan`` for a non-finite ``W``."""
    eigs = _matrix_eigenvalues(W)
    return math.nan if eigs is None else powerlaw_fit(eigs).alpha


def alpha_hill_median(W: Tensor) -> float:
    """Hill estimator of ``W``'s ESD with the median ``xmin`` rule (:func:`powerlaw_alpha`):
    a different, faster estimator than :func:`alpha_csn`, not WeightWatcher's alpha.

    Numerically zero singular values (below :func:`rank_rtol` of ``W``'s storage dtype) are
    left out of the fit; a matrix with fewer than 2 non-zero ones gives ``nan``.
    """
    eigs = _matrix_eigenvalues(W)
    return math.nan if eigs is None else powerlaw_alpha(eigs)


alpha_hill = alpha_hill_median
"""Former name of :func:`alpha_hill_median` (the median-``xmin`` Hill estimator)."""

ALPHA_ESTIMATORS = ("csn", "hill_median")
"""Names :func:`metrics_from_singular_values` accepts for ``alpha``: ``"csn"`` (the default,
:func:`powerlaw_fit`, WeightWatcher's alpha) and ``"hill_median"`` (:func:`powerlaw_alpha`)."""


def alpha_from_eigenvalues(eigs: Tensor, estimator: str = "csn") -> float:
    """Alpha of a set of ESD eigenvalues by the named estimator (:data:`ALPHA_ESTIMATORS`)."""
    if estimator == "csn":
        return powerlaw_fit(eigs).alpha
    if estimator == "hill_median":
        return powerlaw_alpha(eigs)
    raise ValueError(f"unknown alpha estimator {estimator!r}: use one of {ALPHA_ESTIMATORS}")


def farms_windows(shape: tuple[int, int], aspect: float = 1.0, overlap: float = 0.5,
                  window: int | None = None) -> list[tuple[int, int, int, int]]:
    """Windows ``(r0, r1, c0, c1)`` of a fixed aspect ratio tiling an ``m x n`` matrix.

    FARMS (Hu et al. 2025) measures heavy-tailedness on submatrices of one fixed aspect ratio
    ``rows / cols = aspect`` so that matrices of different shapes are compared on equal terms.
    The window's short side is ``window`` (default: as large as fits); windows step by
    ``(1 - overlap)`` of their size along each axis, and the last window is flush with the edge.
    """
    m, n = shape
    if window is None:
        window = min(n, int(m / aspect)) if aspect >= 1 else min(m, int(n * aspect))
    rows = max(1, int(round(window * aspect))) if aspect >= 1 else window
    cols = window if aspect >= 1 else max(1, int(round(window / aspect)))
    rows, cols = min(rows, m), min(cols, n)

    def starts(size: int, length: int) -> list[int]:
        step = max(1, int(length * (1 - overlap)))
        out = list(range(0, max(size - length, 0) + 1, step))
        if out[-1] != size - length:
            out.append(size - length)
        return out

    return [(r, r + rows, c, c + cols) for r in starts(m, rows) for c in starts(n, cols)]


def farms_alpha(W: Tensor, aspect: float = 1.0, overlap: float = 0.5,
                window: int | None = None) -> float:
    """FARMS alpha: fit the pooled ESD of fixed-aspect-ratio overlapping submatrices.

    Each window ``X`` contributes the eigenvalues of ``X^T X / rows`` (normalized so windows of
    one size are on one scale); all windows' eigenvalues are pooled into one ESD and fitted with
    :func:`powerlaw_alpha`. Windows of one shape are decomposed in one batched SVD.
    Numerically zero singular values of each window (the :func:`rank_rtol` rule) are left out.
    """
    Wc = as_compute_tensor(W, torch.float64)
    if not bool(torch.isfinite(Wc).all()):
        return math.nan
    wins = farms_windows(tuple(Wc.shape), aspect, overlap, window)
    stack = torch.stack([Wc[r0:r1, c0:c1] for r0, r1, c0, c1 in wins])
    s = torch.linalg.svdvals(stack)
    rtol = rank_rtol(tuple(stack.shape[-2:]), W.dtype)
    keep = s > rtol * s[..., :1]
    return powerlaw_alpha(s[keep] ** 2 / stack.shape[-2])


# ----------------------------------------------------------------------------------------------
# Fiedler value of the neuron correlation graph


def fiedler_value(W: Tensor) -> float:
    """Algebraic connectivity of the row-similarity graph, as the ASSR README describes it.

    Graph: one node per non-zero row ``w_i`` of ``W`` (all-zero rows are dropped, their cosine
    is undefined); edge weight ``A_ij = |cos(w_i, w_j)|`` for ``i != j``, ``A_ii = 0``.
    Returns the second-smallest eigenvalue of the normalized Laplacian
    ``L = I - D^{-1/2} A D^{-1/2}`` (``D = diag(A 1)``), in ``[0, m/(m-1)]``. Isolated nodes
    (degree 0) get ``L_ii = 0`` (Chung's convention), so each of them, like each connected
    component, contributes one zero eigenvalue: a disconnected graph has value 0.

    Note the direction: rows that are all nearly parallel (rank collapse) form a complete graph
    with equal weights and the *largest* value, ``m/(m-1)``; mutually orthogonal rows form an
    edgeless graph with value 0. Cost ``O(m^2 n + m^3)``: use it on a row biopsy.
    """
    Wc = as_compute_tensor(W, torch.float64)
    if not bool(torch.isfinite(Wc).all()):
        return math.nan
    norms = Wc.norm(dim=1)
    rows = Wc[norms > 0] / norms[norms > 0, None]
    m = rows.shape[0]
    if m < 2:
        return math.nan
    A = (rows @ rows.T).abs()
    A.fill_diagonal_(0)
    deg = A.sum(1)
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(1e-300).rsqrt(), torch.zeros_like(deg))
    L = torch.diag((deg > 0).to(A.dtype)) - inv_sqrt[:, None] * A * inv_sqrt[None, :]
    return float(torch.linalg.eigvalsh(L)[1].clamp_min(0))


# ----------------------------------------------------------------------------------------------
# Hygiene


@dataclass(frozen=True)
class Hygiene:
    """Value-level health of one matrix: counts, no thresholds."""

    nan: int
    inf: int
    dead_rows: int
    dead_cols: int
    duplicate_rows: int

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf


def count_nonfinite(W: Tensor, chunk_rows: int = 4096) -> tuple[int, int]:
    """``(nan count, inf count)``, scanned in row chunks so no full-size mask is built."""
    W = W.detach()
    if W.dim() < 2:
        W = W.reshape(1, -1)
    W = W.reshape(-1, W.shape[-1])
    nan = inf = 0
    for start in range(0, W.shape[0], chunk_rows):
        block = W[start:start + chunk_rows]
        if block.element_size() == 1:
            block = block.to(torch.float32)
        nan += int(torch.isnan(block).sum())
        inf += int(torch.isinf(block).sum())
    return nan, inf


def _unit_rows(S: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``S`` (or of each matrix of a stack) scaled to unit norm, zero rows left zero,
    and the mask of non-zero rows."""
    norms = S.norm(dim=-1, keepdim=True)
    live = norms > 0
    return S / torch.where(live, norms, 1.0), live[..., 0]


def _has_duplicate(unit: Tensor, start: int, stop: int, cos_threshold: float) -> Tensor:
    """For rows ``start:stop`` of unit-norm ``unit`` (``(m, n)`` or ``(B, m, n)``): does some
    other row have cosine similarity ``>= cos_threshold`` with it?"""
    sim = unit[..., start:stop, :] @ unit.mT
    r = torch.arange(stop - start)
    sim[..., r, start + r] = -2.0  # not with itself
    return (sim >= cos_threshold).any(dim=-1)


def duplicate_rows(W: Tensor, cos_threshold: float = 0.999, chunk_rows: int = 1024) -> int:
    """Number of non-zero rows whose cosine similarity with some other row is ``>= threshold``.

    Cost ``O(m^2 n)``, computed in row chunks: run it on a row biopsy for large ``m``.
    """
    unit, live = _unit_rows(as_compute_tensor(W, torch.float32))
    rows = unit[live]
    m = rows.shape[0]
    return sum(int(_has_duplicate(rows, start, min(start + chunk_rows, m), cos_threshold).sum())
               for start in range(0, m, chunk_rows))


def duplicate_rows_batched(stack: Tensor, cos_threshold: float = 0.999) -> list[int]:
    """:func:`duplicate_rows` of each matrix of a ``(B, m, n)`` stack, in one batched product.

    Zero rows take no part (a zero row stays zero, whose cosine with every row is 0, below any
    positive threshold); the threshold must therefore be positive.
    """
    if not cos_threshold > 0:
        raise ValueError(f"duplicate_rows_batched needs a positive threshold, got {cos_threshold}")
    unit, _ = _unit_rows(as_compute_tensor(stack, torch.float32))
    return _has_duplicate(unit, 0, unit.shape[-2], cos_threshold).sum(dim=-1).tolist()


def hygiene(W: Tensor, duplicate_threshold: float = 0.999) -> Hygiene:
    """NaN/Inf counts, all-zero rows (dead output units) and columns (dead inputs), and
    near-duplicate rows. Non-finite entries are ignored when judging zero rows/columns."""
    nan, inf = count_nonfinite(W)
    Wc = as_compute_tensor(W)
    finite = torch.nan_to_num(Wc, nan=1.0, posinf=1.0, neginf=1.0)
    zero = finite == 0
    dead_rows = int(zero.all(dim=1).sum())
    dead_cols = int(zero.all(dim=0).sum())
    dups = duplicate_rows(finite, duplicate_threshold) if nan + inf == 0 else 0
    return Hygiene(nan, inf, dead_rows, dead_cols, dups)


# ----------------------------------------------------------------------------------------------
# One-call summary


@dataclass(frozen=True)
class SpectralMetrics:
    """Spectral sensors of one matrix. Values are ``nan`` when the matrix is not finite."""

    shape: tuple[int, int]
    sigma_max: float
    sigma_min: float
    frobenius: float
    stable_rank: float
    stable_rank_ratio: float
    condition_number: float
    effective_rank: float
    effective_rank_ratio: float
    alpha: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def metrics_from_singular_values(s: Tensor, shape: tuple[int, int], rtol: float = 0.0,
                                 alpha: bool | str = False) -> SpectralMetrics:
    """Every SVD-based sensor from one descending vector of singular values ``s``.

    ``alpha``: ``False`` skips the fit (``nan``); ``True`` or ``"csn"`` is the HT-SR power-law
    fit WeightWatcher reports (:func:`powerlaw_fit`); ``"hill_median"`` the faster median-xmin
    Hill estimator (:func:`powerlaw_alpha`), a different number.
    """
    return metrics_from_singular_values_batched(s.reshape(1, -1), shape, rtol, alpha)[0]


def metrics_from_singular_values_batched(s: Tensor, shape: tuple[int, int], rtol: float = 0.0,
                                         alpha: bool | str = False) -> list[SpectralMetrics]:
    """:func:`metrics_from_singular_values` of each row of a ``(B, k)`` stack of descending
    singular values of same-shape matrices: the sensors vectorized over the stack, and the
    power-law fits of all rows with the same number of non-zero eigenvalues in one
    :func:`powerlaw_fits` call."""
    s = s.detach().to(torch.float64)
    k = max(min(shape[-2], shape[-1]), 1)
    sr = stable_rank_from_sv(s).tolist()
    er = effective_rank_from_sv(s).tolist()
    kappa = condition_number_from_sv(s, rtol).tolist()
    fro = torch.sqrt((s**2).sum(-1)).tolist()
    top, bottom = s[:, 0].tolist(), s[:, -1].tolist()
    alphas = _alphas(s, rtol, "csn" if alpha is True else alpha) if alpha else [math.nan] * len(sr)
    return [SpectralMetrics(shape=(int(shape[-2]), int(shape[-1])), sigma_max=top[i],
                            sigma_min=bottom[i], frobenius=fro[i], stable_rank=sr[i],
                            stable_rank_ratio=sr[i] / k, condition_number=kappa[i],
                            effective_rank=er[i], effective_rank_ratio=er[i] / k,
                            alpha=alphas[i]) for i in range(len(sr))]


def _alphas(s: Tensor, rtol: float, estimator: str) -> list[float]:
    """Alpha of each row of descending singular values (:func:`alpha_from_eigenvalues` of its
    non-zero eigenvalues); CSN fits of rows with equally many eigenvalues are batched."""
    eigs = [nonzero_eigenvalues_from_sv(row, rtol) for row in s]
    out = [math.nan] * len(eigs)
    by_size: dict[int, list[int]] = {}
    for i, e in enumerate(eigs):
        if estimator == "csn" and e.numel() >= SMALL_N and bool(torch.isfinite(e).all()):
            by_size.setdefault(e.numel(), []).append(i)
        else:
            out[i] = alpha_from_eigenvalues(e, estimator)
    for idx in by_size.values():
        lam = torch.sort(torch.stack([eigs[i] for i in idx]), dim=1).values  # as powerlaw_fit
        for i, fit in zip(idx, powerlaw_fits(lam), strict=True):
            out[i] = fit.alpha
    return out


def nonfinite_metrics(shape: tuple[int, int]) -> SpectralMetrics:
    nan = math.nan
    return SpectralMetrics((int(shape[-2]), int(shape[-1])), nan, nan, nan, nan, nan, nan, nan,
                           nan, nan)
