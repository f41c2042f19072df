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

16-bit weights stay 16-bit: the collapse and l2 terms of a bf16/fp16 ``W`` are computed in
float32 inside a custom autograd function that saves ``W`` itself (the parameter: no new
memory) instead of an fp32 copy kept alive until backward; the fp32 copy is made transiently,
in the forward and again in the backward. Same values and formula as the fp32 path
(``tests/test_guard_penalties.py`` measures the saved tensors).
"""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor


HALF = (torch.float16, torch.bfloat16)


def _compute(W: Tensor) -> Tensor:
    return W.float() if W.dtype in HALF else W


class _Collapse16(torch.autograd.Function):
    """``(u^T W v)^2 / ||W||_F^2`` of a 16-bit ``W`` in float32, saving only ``W``, ``u``,
    ``v`` and two scalars; gradient ``2 sigma/F2 u v^T - 2 sigma^2/F2^2 W``."""

    @staticmethod
    def forward(ctx: Any, W: Tensor, u: Tensor, v: Tensor) -> Tensor:
        Wf = W.float()
        sigma = u @ Wf @ v
        f2 = Wf.square().sum()
        ctx.save_for_backward(W, u, v, sigma, f2)
        return sigma.square() / f2

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        W, u, v, sigma, f2 = ctx.saved_tensors
        g_sigma = g * 2.0 * sigma / f2
        g_f2 = -g * sigma.square() / f2.square()
        grad = torch.outer(u * g_sigma, v) + W.float() * (2.0 * g_f2)
        return grad.to(W.dtype), None, None


class _Frobenius16(torch.autograd.Function):
    """``||W||_F^2`` of a 16-bit ``W`` in float32, saving only ``W``."""

    @staticmethod
    def forward(ctx: Any, W: Tensor) -> Tensor:
        ctx.save_for_backward(W)
        return W.float().square().sum()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (W,) = ctx.saved_tensors
        return (W.float() * (2.0 * g)).to(W.dtype)


def spectral_collapse_term(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``(u^T W v)^2 / ||W||_F^2`` (see module docstring), differentiable in ``W``."""
    if W.dtype in HALF:
        return _Collapse16.apply(W, u.float(), v.float())
    sigma = u.to(W.dtype) @ W @ v.to(W.dtype)
    return sigma.square() / W.square().sum()


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
    return _Frobenius16.apply(W) if W.dtype in HALF else W.square().sum()
