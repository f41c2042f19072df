"""The matrix-sign actuator: restore a layer's stable rank by replacing W with its sign.

For ``W = U S V^T`` (thin SVD, ``k = min(m, n)``) the matrix sign (polar factor) is
``msign(W) = U V^T``: every singular value set to 1, the singular vectors kept. The actuator
keeps the Frobenius norm:

    ``W <- (||W||_F / ||U V^T||_F) U V^T = (||W||_F / sqrt(rank)) U V^T``

so the stable rank ``||W||_F^2 / ||W||_2^2`` becomes its largest possible value (``k`` for a
full-rank ``W``) and the effective rank becomes ``k``, while the layer's overall scale is
unchanged. This is the operation MSign (Ren et al. 2026, arXiv 2602.01734) applies periodically
to every weight matrix to break the stable-rank collapse it finds before gradient explosions;
the guard applies it to the layers its checks flag for collapse (``actuator="msign"``) and,
optionally, to every guarded layer every ``msign_every`` steps (the paper's schedule).

Computation:

* on the CPU, an exact float64 SVD (``torch.linalg.svd``), singular values under
  ``RANK_RTOL * s_1`` treated as zero (their directions are not amplified from noise);
* on an accelerator, a Newton-Schulz iteration on the device (matrix products only: no
  decomposition library, no host read), the quintic ``X <- a X + (b A + c A^2) X`` with
  ``A = X X^T``, ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` as in the Muon optimizer (Jordan et
  al. 2024), from ``X_0 = W / ||W||_F``. It maps every singular value of ``X_0`` above about
  ``1e-3`` into roughly ``[0.7, 1.2]`` in :data:`NS_STEPS` steps: an approximate sign whose
  stable rank is within a factor ~3 of the exact one (tested against the SVD).

Which layers, when (``GuardConfig.msign_every``, ``msign_gate``): with the ``"alarm"`` gate
(the default) the periodic sign runs only if the guard's alarm was raised since the previous
multiple of ``msign_every`` (a quorum of layers that collapsed suddenly, or an attention pair
far over its target: :mod:`.alarm`) and only on layers that **looked randomly
initialized when instrumented**
(:func:`looks_random_init`): the sign is a pretraining remedy, and flattening the spectrum of a
pretrained layer would erase what it learned. ``"always"`` is MSign's unconditional schedule on
every penalized layer.

A weight with a non-finite entry is left unchanged (``torch.where`` on the device; on the CPU
also one whose SVD fails to converge).
"""

from __future__ import annotations

import math

import torch

from ..random_init import is_mp_like, mp_spectrum_statistics

Tensor = torch.Tensor

RANK_RTOL = 1e-6
"""Singular values below ``RANK_RTOL * s_1`` count as zero in the exact (CPU) path."""

NS_STEPS = 6
"""Quintic Newton-Schulz steps of the device path."""

NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""``(a, b, c)`` of the quintic iteration (Muon's published coefficients)."""


def looks_random_init(stable_rank: float, effective_rank: float, shape: tuple[int, int]) -> bool:
    """Whether a matrix's spectrum is that of i.i.d. noise (a fresh initialization).

    The Marchenko-Pastur test of :mod:`spectral_guard.random_init`, from the two readings the
    guard takes anyway: with ``p <= q`` the sides and ``y = p / q``, the top-edge statistic
    ``e = sqrt(p / SR) / (1 + sqrt y)`` (``SR = ||W||_F^2 / sigma_max^2``; 1 at the MP edge) is
    at most ``MP_EDGE_MAX`` and ``erank / erank(MP_{p,q})`` at least ``MP_ERANK_MIN``. A side
    under ``MP_MIN_SIDE`` is not judged (``False``).

    Args:
        stable_rank: ``||W||_F^2 / sigma_max^2`` of the measured matrix.
        effective_rank: its Roy-Vetterli effective rank.
        shape: its shape (for the guard, the biopsy's).

    Returns:
        ``True`` when both statistics are those of a random matrix.
    """
    if not stable_rank > 0 or not effective_rank > 0:
        return False
    stats = mp_spectrum_statistics(1 / math.sqrt(stable_rank), effective_rank, shape)
    return stats is not None and is_mp_like(*stats)


def polar_exact(W: Tensor) -> Tensor:
    """``U V^T`` of ``W`` by a float64 SVD, restricted to ``s_i > RANK_RTOL * s_1``.

    Args:
        W: an ``m x n`` matrix.

    Returns:
        The polar factor in float64 (rank ``r``: ``r`` singular values equal to 1).
    """
    U, s, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    keep = s > RANK_RTOL * s[:1].clamp_min(torch.finfo(torch.float64).tiny)
    return (U * keep) @ Vh


def polar_newton_schulz(W: Tensor, steps: int = NS_STEPS) -> Tensor:
    """Approximate ``U V^T`` of ``W`` by the quintic Newton-Schulz iteration (device only).

    Args:
        W: an ``m x n`` matrix on any device.
        steps: iterations.

    Returns:
        A float32 matrix whose singular vectors are ``W``'s and whose singular values are close
        to 1 (see the module docstring for how close).
    """
    a, b, c = NS_COEFFS
    X = W.detach().float()
    wide = X.shape[0] <= X.shape[1]
    if not wide:
        X = X.mT
    X = X / X.norm().clamp_min(1e-30)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


@torch.no_grad()
def msign_(W: Tensor) -> Tensor:
    """Replace ``W`` in place by ``(||W||_F / ||P||_F) P``, ``P`` the polar factor of ``W``.

    Args:
        W: the stored weight (a leaf ``Parameter`` is fine: this runs under ``no_grad``).

    Returns:
        ``W`` (modified in place; unchanged if it has a non-finite entry or is zero).

    Example:
        >>> W = torch.randn(8, 4) @ torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.01]))
        >>> s = torch.linalg.svdvals(msign_(W))
        >>> bool(torch.allclose(s, s[0].expand(4)))
        True
    """
    if W.device.type == "cpu":   # host values: checking them costs no device sync
        if not bool(torch.isfinite(W).all()):
            return W
        try:
            P = polar_exact(W)
        except torch.linalg.LinAlgError:   # LAPACK did not converge: leave the weight as is
            return W
        frob = W.detach().double().norm()
    else:
        P, frob = polar_newton_schulz(W), W.detach().float().norm()
    new = P * (frob / P.norm().clamp_min(1e-30))
    ok = torch.isfinite(new).all() & (frob > 0)
    W.copy_(torch.where(ok, new.to(W.dtype), W))
    return W
