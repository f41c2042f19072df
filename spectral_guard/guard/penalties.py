"""Differentiable penalty terms. Each returns a scalar whose gradient flows into ``W``.

* collapse (spectral):  ``P = sigma^2 / ||W||_F^2 = 1 / SR(W)`` with ``sigma = u^T W v`` and
  ``u, v`` the warm power-iteration vectors held constant. Its gradient
  ``2 sigma u v^T / ||W||_F^2 - 2 sigma^2 W / ||W||_F^4`` shrinks the top direction relative
  to the rest, i.e. raises stable rank; it is scale-invariant (does not shrink ``W``).
* conditioning:  on the biopsy ``B`` (a differentiable gather of ``W``) with singular pairs
  ``(u_i, s_i, v_i)`` from the check's one SVD, ``s_i(B) = u_i^T B v_i`` (exact first-order).
  With the allowed condition number ``kappa_t`` and ``eps = 1e-3 s_1`` (a constant),
  ``P = mean_i relu(log(s_1 + eps) - log(s_i + eps) - log kappa_t)``: a hinge in log space on
  exactly the singular values that violate the ceiling; each is pushed up with a force
  ``~ 1 / (s_i + eps)``, bounded by ``1 / eps`` (plain ``log kappa`` has an unbounded
  gradient at ``s_k -> 0``). Zero when the biopsy satisfies ``s_1 / s_i <= kappa_t``.
* l2:  ``P = ||W||_F^2`` (what the public ASSR code applies), for comparisons.

The caller multiplies by the layer's lambda.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _compute(W: Tensor) -> Tensor:
    return W.float() if W.dtype in (torch.float16, torch.bfloat16) else W


def spectral_collapse_term(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``(u^T W v)^2 / ||W||_F^2`` (see module docstring), differentiable in ``W``."""
    Wc = _compute(W)
    sigma = u.to(Wc.dtype) @ Wc @ v.to(Wc.dtype)
    return sigma.square() / Wc.square().sum()


def condition_term(B: Tensor, U: Tensor, V: Tensor, log_kappa_max: float, eps: float) -> Tensor:
    """Log-space hinge on the biopsy's spectrum (see module docstring).

    ``U`` (r x q) and ``V`` (c x q) hold the singular vector pairs to act on, the top pair
    first; ``s = diag(U^T B V)``. ``eps`` is an absolute constant (``1e-3 s_1`` at the check).
    """
    Bc = _compute(B)
    U, V = U.to(Bc.dtype), V.to(Bc.dtype)
    s = ((U.mT @ Bc) * V.mT).sum(-1)
    gap = torch.log(s[0] + eps) - torch.log(s[1:] + eps) - log_kappa_max
    if gap.numel() == 0:
        return Bc.sum() * 0.0
    return torch.relu(gap).sum() / max(min(B.shape[-2:]), 1)


def l2_term(W: Tensor) -> Tensor:
    """``||W||_F^2``."""
    return _compute(W).square().sum()
