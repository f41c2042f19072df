"""The row-normalized stable rank: do the rows point the same way, whatever their norms?

``row_SR(W) = SR(N) = ||N||_F^2 / sigma_max(N)^2`` with ``N`` the rows of ``W`` scaled to unit
norm (all-zero rows left out, so ``||N||_F^2`` is the number of non-zero rows). ``1 <= row_SR
<= rank(W)``: 1 when every row is parallel to one vector, about ``r`` when the rows spread
evenly over ``r`` directions. Unlike the stable rank it does not see how the energy is shared
between rows: a matrix with a few output channels of huge norm pointing different ways has a
stable rank near 1 (one row holds the energy) and a large row-normalized stable rank; a
rank-1 matrix, or a spike ``W + c u v^T`` that dominates most rows, has both near 1.

The audit measures it on the matrix it measures (the biopsy in biopsy mode, with each row
scaled by its norm within the biopsy; the whole matrix in exact mode): one ``sigma_max`` of
``N``. Where ``N``'s shorter side is at most :data:`EIG_MAX` (every biopsy) it is the top
eigenvalue of the float64 Gram matrix of that side. Beyond, Lanczos iteration (a Krylov method:
power iteration that keeps its past vectors) on ``N`` and ``N^T``, started from the rows' mean
direction (the top direction when the rows align, so collapsed matrices converge in a few
steps); the top Ritz value, a lower bound of ``sigma_max^2``, is taken once it moves by less
than :data:`RTOL` over 4 steps (at most :data:`MAX_STEPS`; a clustered top, where it converges
slowest, means rows that spread, far above any floor). Measured against numpy's float64 SVD:
1e-9 relative on the Gram path, 1e-6 on the Lanczos path with float32 ``N``.
"""

from __future__ import annotations

import torch

EIG_MAX = 256
"""Up to this shorter side ``k`` (every biopsy at the default limit 128), ``sigma_max(N)^2`` is
the top eigenvalue of the float64 Gram matrix of that side (``eigvalsh``, exact: 0.25 ms for a
128 x 96 biopsy, one thread). Beyond it, Lanczos iteration on ``N`` and ``N^T`` (no ``k x k``
matrix is formed), with ``N`` in the precision the exact path decomposes in (float32, float64
for F64 storage) and the Krylov basis in float64."""

MAX_STEPS = 64
"""Lanczos steps at most (the Krylov space of the rows' mean direction)."""

RTOL = {torch.float64: 1e-13, torch.float32: 1e-8}
"""Stop when the top Ritz value moved by less than this (relative) over the last 4 steps (by
the precision of ``N``: float32 products carry ~1e-7 anyway)."""


def _top_eigenvalue(step, x: torch.Tensor, k: int, rtol: float) -> float:
    """The largest eigenvalue of the symmetric PSD operator ``step`` (``k x k``): Lanczos from
    ``x`` with full reorthogonalization, the top Ritz value (a lower bound, exact once the
    Krylov space is invariant), checked every 4 steps."""
    basis = [x / x.norm()]
    images: list[torch.Tensor] = []
    top = 0.0
    for i in range(min(MAX_STEPS, k)):
        images.append(step(basis[-1]))
        Q, AQ = torch.stack(basis, 1), torch.stack(images, 1)
        w = images[-1]
        for _ in range(2):  # full reorthogonalization, twice
            w = w - Q @ (Q.mT @ w)
        norm = float(w.norm())
        last = i + 1 == min(MAX_STEPS, k)
        invariant = norm <= 1e-10 * float(images[-1].norm())
        if (i + 1) % 4 == 0 or invariant or last:
            T = Q.mT @ AQ
            new = float(torch.linalg.eigvalsh((T + T.mT) / 2)[-1])
            if invariant or last or abs(new - top) <= rtol * new:
                return new
            top = new
        basis.append(w / norm)
    return top


@torch.no_grad()
def row_stable_rank(M: torch.Tensor) -> float | None:
    """``SR`` of ``M`` with its rows scaled to unit norm (module docstring); ``None`` for a
    matrix with no non-zero row or a non-finite entry."""
    if M.dim() != 2 or not bool(torch.isfinite(M).all()):
        return None
    small = min(M.shape) <= EIG_MAX
    N = M.detach().to(torch.float64 if small or M.dtype == torch.float64 else torch.float32)
    norms = torch.linalg.vector_norm(N, dim=1, dtype=torch.float64)
    keep = norms > 0
    if not bool(keep.any()):
        return None
    if not bool(keep.all()):
        N, norms = N[keep], norms[keep]
    N = N / norms.to(N.dtype).unsqueeze(1)
    rows, cols = N.shape
    if rows == 1:
        return 1.0
    tall = cols <= rows  # work in the shorter side's space
    if small:
        G = N.mT @ N if tall else N @ N.mT
        lam = float(torch.linalg.eigvalsh(G)[-1])
        return rows / lam if lam > 0 else None
    mean = N.sum(0, dtype=torch.float64)
    x = mean if tall else (N @ mean.to(N.dtype)).double()
    if float(x.norm()) == 0:  # the rows cancel exactly: any start works
        x = torch.ones_like(x)
    dt = N.dtype
    if tall:
        lam = _top_eigenvalue(lambda y: (N.mT @ (N @ y.to(dt))).double(), x, cols, RTOL[dt])
    else:
        lam = _top_eigenvalue(lambda y: (N @ (N.mT @ y.to(dt))).double(), x, rows, RTOL[dt])
    return rows / lam if lam > 0 else None
