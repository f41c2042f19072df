"""Penalty terms: values and gradients against exact-SVD references (float64, torch.func)."""

from __future__ import annotations

import math

import torch
from torch.func import grad

from spectral_guard.estimators import power_iteration
from spectral_guard.guard.penalties import condition_term, l2_term, spectral_collapse_term
from spectral_guard.sensors import condition_number, stable_rank


def _matrix(m: int, n: int, svals: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    S = torch.zeros(m, n, dtype=torch.float64)
    S[range(k), range(k)] = torch.tensor(svals, dtype=torch.float64)
    return U @ S @ V.T


def test_spectral_term_value_and_gradient_match_exact_inverse_stable_rank():
    W = _matrix(20, 12, [5.0, 2.0, 1.5, 1.0, 0.9, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    U, S, Vh = torch.linalg.svd(W)
    u, v = U[:, 0], Vh[0]

    def exact(X):
        return torch.linalg.svdvals(X)[0] ** 2 / X.square().sum()

    assert torch.allclose(spectral_collapse_term(W, u, v), exact(W), rtol=1e-12)
    g_ours = grad(lambda X: spectral_collapse_term(X, u, v))(W)
    assert torch.allclose(g_ours, grad(exact)(W), rtol=1e-9, atol=1e-12)
    # with warm power-iteration vectors (the guard's path) the gradient is close
    _, state = power_iteration(W, None, n_iter=60)
    g_pow = grad(lambda X: spectral_collapse_term(X, state.u, state.v))(W)
    assert torch.allclose(g_pow, grad(exact)(W), rtol=1e-6, atol=1e-9)


def test_spectral_term_descent_raises_stable_rank():
    W = _matrix(32, 32, [10.0] + [1.0] * 31, seed=1).float()
    sr0 = stable_rank(W)
    _, state = power_iteration(W, None, n_iter=50)
    for _ in range(20):
        X = W.clone().requires_grad_(True)
        spectral_collapse_term(X, state.u, state.v).backward()
        W = W - 5.0 * X.grad
        _, state = power_iteration(W, state, n_iter=2)
    assert stable_rank(W) > 1.5 * sr0


def _reference_condition(B, log_k, eps):
    s = torch.linalg.svdvals(B)
    gap = torch.log(s[0] + eps) - torch.log(s[1:] + eps) - log_k
    return torch.relu(gap).sum() / min(B.shape)


def test_condition_term_value_and_gradient_match_exact_svd():
    svals = [8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.03, 0.01]
    B = _matrix(10, 8, svals, seed=2)
    kappa_t = 30.0
    U, s, Vh = torch.linalg.svd(B, full_matrices=False)
    eps = 1e-3 * float(s[0])
    gap = torch.log(s[0] + eps) - torch.log(s + eps) - math.log(kappa_t)
    idx = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(gap > 0).flatten()])
    assert idx.numel() == 4  # 0.1, 0.03, 0.01 violate 8 / 30
    Ui, Vi = U[:, idx], Vh[idx].T
    ours = condition_term(B, Ui, Vi, math.log(kappa_t), eps)
    ref = _reference_condition(B, math.log(kappa_t), eps)
    assert torch.allclose(ours, ref, rtol=1e-12)
    g_ours = grad(lambda X: condition_term(X, Ui, Vi, math.log(kappa_t), eps))(B)
    g_ref = grad(lambda X: _reference_condition(X, math.log(kappa_t), eps))(B)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-10)


def test_condition_term_is_zero_when_within_ceiling_and_descent_lowers_kappa():
    B = _matrix(12, 12, [1.0 - 0.05 * i for i in range(12)], seed=3)
    U, s, Vh = torch.linalg.svd(B)
    assert float(condition_term(B, U[:, :3], Vh[:3].T, math.log(10.0), 1e-3)) == 0.0
    W = _matrix(12, 12, [4.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005],
                seed=4)
    k0 = condition_number(W)
    for _ in range(30):
        U, s, Vh = torch.linalg.svd(W)
        eps = 1e-3 * float(s[0])
        X = W.clone().requires_grad_(True)
        condition_term(X, U, Vh.T, math.log(10.0), eps).backward()
        W = W - 0.02 * X.grad
    assert condition_number(W) < k0 / 10


def test_l2_term_and_half_precision_inputs():
    W = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(l2_term(W), (W**2).sum())
    assert torch.allclose(grad(l2_term)(W), 2 * W)
    Wh = W.to(torch.bfloat16)
    u = torch.ones(5) / math.sqrt(5)
    v = torch.ones(7) / math.sqrt(7)
    out = spectral_collapse_term(Wh, u, v)
    assert out.dtype == torch.float32 and math.isfinite(float(out))


def test_bf16_penalty_saves_the_weights_not_an_fp32_copy_and_matches_the_fp32_math():
    """Every layer treated, bf16 weights: the tensors the penalty saves for backward
    (``saved_tensors_hooks``) are the weights themselves plus vectors, not fp32 copies
    (before: 2x the weights' bytes, an fp32 copy of each); value and gradient are the fp32
    formula's, rounded to bf16."""
    from guard_models import seeded_model

    import spectral_guard

    model = seeded_model(0, n_layers=2, d=64, heads=4, seq=16).to(torch.bfloat16)
    guard = spectral_guard.instrument(model, attention=False, msign_every=0, auto_loss=False)
    for layer in guard.layers:
        layer.state.lambdas["collapse"] = 0.01
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {"all": 0, "new": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        saved["all"] += n
        saved["new"] += n * (t.untyped_storage().data_ptr() not in weights)
        return t

    x = torch.randint(0, 256, (2, 16))
    model(x, x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pen = guard.penalty()
    pen.backward()
    w_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in guard.layers)
    assert saved["new"] < 0.05 * w_bytes       # u, v and scalars (was 2 * w_bytes)
    layer = guard.layers[0]
    W = layer.weight.detach().float().requires_grad_()
    u, v = layer.probe.u, layer.probe.v
    ref = (u @ W @ v).square() / W.square().sum()
    ref.backward()
    got = W.detach().bfloat16().requires_grad_()
    value = spectral_collapse_term(got, u, v)
    value.backward()
    assert float(value) == float(ref)
    torch.testing.assert_close(got.grad, W.grad.bfloat16(), rtol=2 ** -7, atol=0)  # 1 ulp
