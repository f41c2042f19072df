"""Independent numpy references for the spectral metrics, shared by the tests.

Everything here is written from the definitions (docs/metrics.md, the papers) with numpy and
plain loops, without importing the package, so a test that compares the package with these
functions compares two implementations, not one with itself.

* singular values     ``numpy.linalg.svd`` in float64 (not torch's LAPACK call)
* stable rank         ``sum s^2 / s_1^2``
* effective rank      ``exp(H(p))``, ``p = s / sum s`` (Roy & Vetterli 2007), zeros left out
* condition number    ``s_1 / s_k``
* row stable rank     the stable rank of the rows scaled to unit norm (all-zero rows dropped)
* alpha               the power-law fit WeightWatcher 0.7.7 reports (:func:`powerlaw_fit`):
                      straight loops over every candidate ``xmin``; and the median-``xmin``
                      Hill estimator (:func:`hill_median_alpha`)
"""

from __future__ import annotations

import math

import numpy as np

WW_EVALS_THRESH = 1e-5
"""WeightWatcher 0.7.7 fits only eigenvalues above this (``EVALS_THRESH``, CPU)."""


def as_numpy64(W) -> np.ndarray:
    """A torch tensor or array as a float64 numpy array (a copy; the input is untouched)."""
    if hasattr(W, "detach"):
        W = W.detach().cpu().double().numpy()
    return np.array(W, dtype=np.float64)


def singular_values(W) -> np.ndarray:
    """Descending singular values of ``W`` by numpy's float64 SVD."""
    return np.linalg.svd(as_numpy64(W), compute_uv=False)


def stable_rank(s: np.ndarray) -> float:
    return float((s**2).sum() / s[0] ** 2)


def effective_rank(s: np.ndarray) -> float:
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def condition_number(s: np.ndarray) -> float:
    return float(s[0] / s[-1])


def row_stable_rank(W) -> float:
    """``sum s^2 / s_1^2`` of ``W`` with each non-zero row divided by its norm (plain loop),
    ``s`` from numpy's float64 SVD."""
    A = as_numpy64(W)
    rows = []
    for row in A:
        norm = math.sqrt(float((row * row).sum()))
        if norm > 0:
            rows.append(row / norm)
    return stable_rank(singular_values(np.array(rows)))


def metrics(W, alpha: bool = True) -> dict[str, float]:
    """Every SVD-based metric of ``W`` (keys as in ``SpectralMetrics``), from numpy's SVD.
    ``alpha`` is :func:`powerlaw_fit`'s on the eigenvalues ``s^2`` without WeightWatcher's
    absolute floor, as the package fits (no eigenvalue of the test matrices is near the
    package's relative rank tolerance)."""
    s = singular_values(W)
    k = min(np.shape(W))
    sr, er = stable_rank(s), effective_rank(s)
    out = dict(sigma_max=float(s[0]), sigma_min=float(s[-1]),
               frobenius=float(np.sqrt((as_numpy64(W) ** 2).sum())),
               stable_rank=sr, stable_rank_ratio=sr / k, condition_number=condition_number(s),
               effective_rank=er, effective_rank_ratio=er / k)
    if alpha:
        out["alpha"] = powerlaw_fit(s**2, thresh=0.0)[0]
    return out


def hill_median_alpha(eigs) -> float:
    """``1 + n / sum log(x / xmin)`` over ``x >= xmin``, ``xmin`` the lower median of the
    positive eigenvalues."""
    lam = np.sort(as_numpy64(eigs).ravel())
    lam = lam[np.isfinite(lam) & (lam > 0)]
    xmin = lam[(lam.size - 1) // 2]
    tail = lam[lam >= xmin]
    return float(1 + tail.size / np.log(tail / xmin).sum())


def _tail_fit(x: np.ndarray, i: int, bias_corrected: bool) -> tuple[float, float]:
    """MLE alpha and one-sided KS distance of the tail ``x[i:]`` with ``xmin = x[i]``, in
    straight loops; distance 1 when ``alpha <= 1``; ``(nan, 1.0)`` for a bias-corrected fit of
    a tail with (almost) no spread, which WeightWatcher skips."""
    tail = x[i:]
    n = len(tail)
    log_sum = 0.0
    for v in tail:
        log_sum += math.log(v / x[i])
    if bias_corrected and log_sum <= 1e-12:
        return math.nan, 1.0
    # a tail with no spread: alpha = inf, and 1 ** -inf = 1, as in numpy
    alpha = 1.0 + ((n - 1.0) if bias_corrected else n) / log_sum if log_sum > 0 else math.inf
    if alpha <= 1.0:
        return alpha, 1.0
    D = 0.0
    for k, v in enumerate(tail):
        fitted = 1.0 - (v / x[i]) ** (1.0 - alpha)  # CDF of the power law from xmin
        empirical = k / n  # fraction of the tail below the k-th point (WeightWatcher's)
        D = max(D, abs(fitted - empirical))
    return alpha, D


def powerlaw_fit(eigs, thresh: float = WW_EVALS_THRESH) -> tuple[float, float, float, int]:
    """``(alpha, xmin, D, n_tail)`` of WeightWatcher 0.7.7's default power-law fit.

    Eigenvalues ``<= thresh`` are dropped. With ``N >= 20`` left: every eigenvalue but the
    largest is a candidate ``xmin``; each gets the continuous MLE ``1 + n / sum log(x/xmin)``
    and the KS distance of its tail; the first smallest distance wins (Clauset, Shalizi &
    Newman 2009). With ``N < 20``: the bias-corrected MLE ``1 + (n - 1) / sum log(x/xmin)``,
    tails of at least 8 only (none: the whole sample). Fewer than 2: all ``nan``.
    """
    x = np.sort(as_numpy64(eigs).ravel())
    x = x[np.isfinite(x) & (x > thresh)]
    N = len(x)
    if N < 2:
        return math.nan, math.nan, math.nan, 0
    small = N < 20
    best = None
    for i in range(N - 1):
        if small and N - i < 8:
            continue
        alpha, D = _tail_fit(x, i, small)
        if small and math.isnan(alpha):
            continue
        if best is None or D < best[2]:
            best = (alpha, float(x[i]), D, N - i)
    if best is None:  # small sample, no tail of 8: the whole sample
        alpha, D = _tail_fit(x, 0, True)
        if math.isnan(alpha):
            return math.nan, math.nan, math.nan, 0
        best = (alpha, float(x[0]), D, N)
    return best
