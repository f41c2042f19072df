"""Sensors on constructed matrices whose answers are known in closed form, plus independent
references (float64 SVD, numpy/scipy) for the heavy-tail and graph sensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as R
import scipy.linalg
import torch
from conftest import gen, haar_orthogonal, pareto_quantiles, trained_like, with_singular_values

from spectral_guard import estimators as E
from spectral_guard import sensors as S
from spectral_guard.random_init import (
    MP_EDGE_MAX,
    MP_ERANK_MIN,
    MP_MIN_SIDE,
    is_mp_like,
    mp_spectrum_statistics,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
REL = {None: 1e-5, F64: 1e-12}
"""Closed-form tolerance per compute path: the default float32 path is good to ~1e-6 here; the
float64 path to ~1e-15, so a float64 path that silently computes in float32 (errors ~1e-7)
fails at 1e-12."""


# ----------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("m,n", [(16, 16), (40, 12), (12, 40)])
def test_orthogonal_rows_or_columns(m, n):
    Q64 = haar_orthogonal(max(m, n), gen(1))[:m, :n] * 3.0  # orthonormal columns/rows, x 3
    # default path on float32 storage (rounded: ~1e-7 off the closed form), float64 path on
    # the float64 matrix (exact to ~1e-15)
    for dtype, Q in ((None, Q64.float()), (F64, Q64)):
        rel = REL[dtype]
        assert S.stable_rank(Q, dtype) == pytest.approx(min(m, n), rel=rel)
        assert S.stable_rank_ratio(Q, dtype) == pytest.approx(1.0, rel=rel)
        assert S.condition_number(Q, dtype) == pytest.approx(1.0, rel=rel)
        assert S.effective_rank_ratio(Q, dtype) == pytest.approx(1.0, rel=rel)
        assert S.spectral_norm(Q, dtype) == pytest.approx(3.0, rel=rel)
        assert S.sigma_min(Q, dtype) == pytest.approx(3.0, rel=rel)
    assert S.singular_values(Q64.float()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n", [(8, 8), (64, 32), (33, 300), (512, 512)])
def test_rank_one(m, n, dtype):
    g = gen(m * 1000 + n)
    u = torch.randn(m, 1, generator=g, dtype=dtype)
    v = torch.randn(1, n, generator=g, dtype=dtype)
    W = u @ v
    assert S.stable_rank(W) == pytest.approx(1.0, rel=1e-5)
    assert S.stable_rank_ratio(W) == pytest.approx(1.0 / min(m, n), rel=1e-5)
    # erank applies no rank tolerance: the float32 rounding floor (k-1 singular values of order
    # eps * s_1) adds a little entropy, measured +1.3e-4 at 512 x 512
    assert S.effective_rank(W) == pytest.approx(1.0, rel=1e-3 if dtype == torch.float32 else 1e-6)
    assert S.condition_number(W) == math.inf
    assert S.spectral_norm(W, F64) == pytest.approx(float(u.norm() * v.norm()), rel=1e-6)
    met = E.spectral_metrics(W)
    assert met.condition_number == math.inf
    assert met.stable_rank == pytest.approx(1.0, rel=1e-5)


def test_diagonal_every_metric_in_closed_form():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    W = torch.zeros(7, 5)
    W[range(5), range(5)] = s
    W = W[torch.tensor([3, 0, 6, 1, 4, 2, 5])]  # permuted rows: still singular values s
    k = 5
    fro2 = float((s**2).sum())
    sr = fro2 / 64.0
    p = s.double() / s.double().sum()  # the closed form in float64
    erank = math.exp(float(-(p * p.log()).sum()))
    for dtype in (None, F64):  # the entries are exact in float32: only the path differs
        rel = REL[dtype]
        assert S.spectral_norm(W, dtype) == pytest.approx(8.0, rel=rel)
        assert S.sigma_min(W, dtype) == pytest.approx(0.5, rel=rel)
        assert S.frobenius_norm(W, dtype) == pytest.approx(math.sqrt(fro2), rel=rel)
        assert S.stable_rank(W, dtype) == pytest.approx(sr, rel=rel)
        assert S.stable_rank_ratio(W, dtype) == pytest.approx(sr / k, rel=rel)
        assert S.condition_number(W, dtype) == pytest.approx(16.0, rel=rel)
        assert S.effective_rank(W, dtype) == pytest.approx(erank, rel=rel)
        assert S.effective_rank_ratio(W, dtype) == pytest.approx(erank / k, rel=rel)
    met64 = E.spectral_metrics(W, dtype=F64)
    met = E.spectral_metrics(W)
    expect = dict(sigma_max=8.0, sigma_min=0.5, frobenius=math.sqrt(fro2), stable_rank=sr,
                  stable_rank_ratio=sr / k, condition_number=16.0, effective_rank=erank,
                  effective_rank_ratio=erank / k)
    for key, value in expect.items():
        assert getattr(met, key) == pytest.approx(value, rel=REL[None]), key
        assert getattr(met64, key) == pytest.approx(value, rel=REL[F64]), key
    assert met.shape == (7, 5)
    # hand-computed numbers, as a check on the closed forms themselves
    assert sr == pytest.approx(85.25 / 64)
    assert 1.0 < erank < 5.0


def test_frobenius_norm_is_accurate_on_large_float32_matrices():
    # torch's float32 norm reduction is off by ~2e-4 relative at this size (measured); the
    # sensor accumulates in float64 and must match a float64 reference to float32 rounding
    W = torch.randn(4096, 1024, generator=gen(14)) + 0.5
    ref = math.sqrt(float((W.double() ** 2).sum()))
    assert S.frobenius_norm(W) == pytest.approx(ref, rel=1e-9)
    assert S.frobenius_norm(W, chunk_elements=1000) == pytest.approx(ref, rel=1e-9)
    assert S.frobenius_norm(W.bfloat16()) == pytest.approx(
        math.sqrt(float((W.bfloat16().double() ** 2).sum())), rel=1e-9)
    assert S.frobenius_norm(torch.zeros(3, 4)) == 0.0


def test_effective_rank_extremes_and_monotonicity():
    flat = torch.diag(torch.full((10,), 2.0))
    assert S.effective_rank(flat) == pytest.approx(10.0, rel=1e-6)
    spiked = torch.diag(torch.tensor([100.0] + [1.0] * 9))
    assert 1.0 < S.effective_rank(spiked) < S.effective_rank(flat)


@pytest.mark.parametrize("m,n", [(256, 256), (512, 128), (1024, 64), (128, 512)])
def test_gaussian_stable_rank_ratio_matches_marchenko_pastur(m, n):
    # For i.i.d. N(0, 1) entries, E||W||_F^2 = m n and sigma_max -> sqrt(m) + sqrt(n), so
    # SR ~ m n / (sqrt(m) + sqrt(n))^2 and SR / min(m, n) ~ 1 / (1 + sqrt(q))^2, q = k / max.
    # Finite size: sigma_max^2 sits a Tracy-Widom distance below the edge, of order
    # (sqrt m + sqrt n)(m^-1/2 + n^-1/2)^(1/3), i.e. about 2 % (+-2 %) of the edge at these
    # sizes, which makes SR a few percent *larger* than the limit; the Frobenius norm itself
    # fluctuates by ~1/sqrt(mn). Measured ratio SR/prediction over 12 draws: 1.017 .. 1.062.
    # Tolerance: within [0.97, 1.10] of the prediction.
    W = torch.randn(m, n, generator=gen(m + 7 * n), dtype=F64)
    pred = (m * n / (math.sqrt(m) + math.sqrt(n)) ** 2) / min(m, n)
    ratio = S.stable_rank_ratio(W) / pred
    assert 0.97 < ratio < 1.10
    # the square case is the ASSR paper's "healthy" reference: SR ratio close to 1/4
    if m == n:
        assert S.stable_rank_ratio(W) == pytest.approx(0.25, rel=0.1)


def test_zero_matrix():
    Z = torch.zeros(6, 4)
    assert S.stable_rank(Z) == 0.0
    assert S.effective_rank(Z) == 0.0
    assert S.condition_number(Z) == math.inf
    met = E.spectral_metrics(Z)
    assert (met.sigma_max, met.sigma_min, met.frobenius) == (0.0, 0.0, 0.0)
    assert met.stable_rank_ratio == 0.0 and met.effective_rank_ratio == 0.0
    assert met.condition_number == math.inf
    assert math.isnan(met.alpha)
    h = S.hygiene(Z)
    assert (h.nan, h.inf, h.dead_rows, h.dead_cols, h.duplicate_rows) == (0, 0, 6, 4, 0)
    assert math.isnan(S.fiedler_value(Z))


@pytest.mark.parametrize("shape", [(1, 9), (9, 1)])
def test_vectors(shape):
    x = torch.arange(1.0, 10.0).reshape(shape)
    norm = math.sqrt(float((x**2).sum()))
    met = E.spectral_metrics(x)
    assert met.shape == shape
    assert met.sigma_max == pytest.approx(norm, rel=1e-6)
    assert met.sigma_min == pytest.approx(norm, rel=1e-6)
    assert met.stable_rank == pytest.approx(1.0)
    assert met.stable_rank_ratio == pytest.approx(1.0)
    assert met.condition_number == pytest.approx(1.0)
    assert met.effective_rank_ratio == pytest.approx(1.0)
    assert math.isnan(met.alpha)  # one eigenvalue: no fit


# ----------------------------------------------------------------------------------------------
# Non-finite values and hygiene


def test_nan_and_inf_are_counted_and_metrics_are_nan():
    W = torch.randn(20, 10, generator=gen(3))
    W[2, 3] = math.nan
    W[5, 1] = math.nan
    W[7, 7] = math.inf
    W[9, 0] = -math.inf
    assert S.count_nonfinite(W) == (2, 2)
    assert S.count_nonfinite(W, chunk_rows=3) == (2, 2)
    h = S.hygiene(W)
    assert (h.nan, h.inf, h.nonfinite) == (2, 2, 4)
    met = E.spectral_metrics(W)  # must not raise
    assert met.shape == (20, 10)
    for key, value in met.as_dict().items():
        if key != "shape":
            assert math.isnan(value), key
    # a biopsy that contains a non-finite entry is non-finite too (limit >= shape keeps it all)
    assert math.isnan(E.spectral_metrics(W, mode="biopsy", limit=32).sigma_max)
    # ... and one that misses them is an ordinary finite biopsy
    clean_rows = torch.tensor([0, 1, 3, 4, 6, 8])
    assert math.isfinite(E.spectral_metrics(W[clean_rows]).sigma_max)
    # low precision non-finite values too
    assert S.count_nonfinite(W.half()) == (2, 2)
    assert math.isnan(E.spectral_metrics(W.bfloat16()).stable_rank)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_single_sensors_report_nan_for_non_finite_input(bad, capfd):
    # LAPACK raised on NaN and, on Inf, printed MKL errors and returned garbage (stable_rank
    # read 0.0); every sensor must say nan instead, and never raise
    W = torch.randn(50, 40, generator=gen(15))
    W[3, 3] = bad
    for fn in (S.stable_rank, S.stable_rank_ratio, S.condition_number, S.effective_rank,
               S.effective_rank_ratio, S.alpha_hill, S.farms_alpha, S.fiedler_value,
               S.spectral_norm, S.sigma_min):
        assert math.isnan(fn(W)), fn.__name__
    assert bool(torch.isnan(S.singular_values(W)).all())
    assert bool(torch.isnan(S.esd(W)).all())
    assert math.isnan(S.frobenius_norm(W)) == math.isnan(bad)
    # a stack: only the bad matrix is nan
    s = S.singular_values(torch.stack([W, torch.ones(50, 40)]))
    assert bool(torch.isnan(s[0]).all()) and float(s[1, 0]) == pytest.approx(math.sqrt(2000))
    assert "ERROR" not in capfd.readouterr().out
    # the from-sv helpers propagate nan instead of turning it into 0
    nan_sv = torch.tensor([math.nan, 1.0])
    assert math.isnan(float(S.stable_rank_from_sv(nan_sv)))
    assert math.isnan(float(S.effective_rank_from_sv(nan_sv)))
    assert math.isnan(float(S.condition_number_from_sv(nan_sv)))


def test_hygiene_dead_units_and_duplicates():
    W = torch.randn(12, 8, generator=gen(4), dtype=F64)
    W[3] = 0.0  # dead output unit
    W[:, 5] = 0.0  # dead input
    W[7] = 2.5 * W[1]  # exact duplicate direction (cosine 1)
    W[10] = -W[2]  # anti-parallel: cosine -1, not a duplicate by the >= threshold rule
    h = S.hygiene(W)
    assert (h.nan, h.inf) == (0, 0)
    assert h.dead_rows == 1
    assert h.dead_cols == 1
    # rows 1 and 7 are duplicates of each other; zero rows never count
    assert h.duplicate_rows == 2
    assert S.duplicate_rows(W, chunk_rows=2) == 2
    # a NaN entry does not make its row or column "dead"
    W2 = torch.zeros(4, 3)
    W2[1, 1] = math.nan
    h2 = S.hygiene(W2)
    assert (h2.nan, h2.dead_rows, h2.dead_cols) == (1, 3, 2)


def test_duplicate_rows_against_numpy():
    g = gen(5)
    base = torch.randn(6, 16, generator=g)
    W = torch.cat([base, base[:2] * 3 + 1e-5 * torch.randn(2, 16, generator=g)])
    rows = W.numpy().astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -2)
    expected = int((cos >= 0.999).any(axis=1).sum())
    assert expected == 4
    assert S.duplicate_rows(W) == expected


# ----------------------------------------------------------------------------------------------
# Precision and autograd hygiene


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_upcast(low):
    W32 = torch.randn(96, 48, generator=gen(6))
    Wlow = W32.to(low)
    before = Wlow.clone()
    rounded = Wlow.to(torch.float32)  # the same rounded values, in float32
    met = E.spectral_metrics(Wlow)
    ref = E.spectral_metrics(rounded)
    for key, value in ref.as_dict().items():
        if key != "shape":
            assert getattr(met, key) == pytest.approx(value, rel=1e-5), key
    assert S.condition_number(Wlow) == pytest.approx(S.condition_number(rounded), rel=1e-5)
    assert S.stable_rank(Wlow) == pytest.approx(S.stable_rank(rounded), rel=1e-5)
    assert S.effective_rank(Wlow) == pytest.approx(S.effective_rank(rounded), rel=1e-5)
    assert S.alpha_hill(Wlow) == pytest.approx(S.alpha_hill(rounded), rel=1e-6)
    assert S.fiedler_value(Wlow) == pytest.approx(S.fiedler_value(rounded), rel=1e-6)
    assert S.singular_values(Wlow).dtype == torch.float32
    assert Wlow.dtype == low and torch.equal(Wlow, before)  # never mutated
    # and the rounded result is close to the float32 original's (rounding is small)
    tol = 5e-3 if low == torch.float16 else 3e-2
    assert met.stable_rank == pytest.approx(S.stable_rank(W32), rel=tol)


def test_rank_tolerance_rule():
    assert S.rank_rtol((100, 400), torch.float32) == pytest.approx(
        torch.finfo(torch.float32).eps * 20)
    assert S.rank_rtol((100, 400), torch.float64) == pytest.approx(
        torch.finfo(torch.float64).eps * 20)
    # 16-bit storage uses float32's epsilon, not its own
    assert S.rank_rtol((4, 9), torch.bfloat16) == S.rank_rtol((4, 9), torch.float32)
    # a singular value just above the tolerance gives a finite kappa, just below gives inf
    rtol = S.rank_rtol((3, 3), torch.float64)
    above = torch.diag(torch.tensor([1.0, 0.5, 4 * rtol], dtype=F64))
    below = torch.diag(torch.tensor([1.0, 0.5, rtol / 4], dtype=F64))
    assert S.condition_number(above) == pytest.approx(1 / (4 * rtol), rel=1e-9)
    assert S.condition_number(below) == math.inf


def test_requires_grad_input_builds_no_graph():
    W = torch.randn(40, 30, generator=gen(7), requires_grad=True)
    before = W.detach().clone()
    s = S.singular_values(W)
    assert not s.requires_grad
    assert not S.esd(W).requires_grad
    for fn in (S.stable_rank, S.stable_rank_ratio, S.condition_number, S.effective_rank,
               S.alpha_hill, S.farms_alpha, S.fiedler_value, S.spectral_norm):
        assert isinstance(fn(W), float), fn.__name__
    met = E.spectral_metrics(W)
    assert isinstance(met.stable_rank, float)
    assert not E.biopsy(W, limit=8).requires_grad
    sigma, state = E.power_iteration(W)
    assert not sigma.requires_grad and not state.u.requires_grad
    S.hygiene(W)
    assert W.grad is None and W.grad_fn is None and W.requires_grad
    assert torch.equal(W.detach(), before)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError):
        S.stable_rank(torch.ones(3, 3, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# Heavy-tail exponent


def _pareto_samples(n: int, alpha: float, g: torch.Generator) -> torch.Tensor:
    # density ~ x^-alpha on [1, inf): inverse CDF of a uniform
    return (1.0 - torch.rand(n, generator=g, dtype=F64)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0, 4.0])
def test_powerlaw_alpha_recovers_exponent_of_samples(alpha):
    # 20000 samples, tail = upper half: the MLE's standard error is (alpha-1)/sqrt(10000),
    # at most 0.03 here; measured errors over 3 seeds <= 0.08
    x = _pareto_samples(20000, alpha, gen(int(alpha * 10)))
    assert S.powerlaw_alpha(x) == pytest.approx(alpha, abs=0.15)
    # the MLE's closed form, computed independently in numpy
    assert S.powerlaw_alpha(x) == pytest.approx(R.hill_median_alpha(x), rel=1e-12)
    # explicit xmin
    assert S.powerlaw_alpha(x, xmin=2.0) == pytest.approx(alpha, abs=0.15)


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_powerlaw_fit_recovers_pareto_exponent(alpha, seed):
    # 4000 draws of an exact Pareto (xmin = 1): whatever xmin the KS rule picks, the tail above
    # it is Pareto with the same alpha, and the MLE's standard error is (alpha - 1)/sqrt(n_tail).
    # Measured over 16 draws: |error| <= 2.2 standard errors, n_tail >= 1900. Tolerance: 4.
    x = _pareto_samples(4000, alpha, gen(100 * seed + int(alpha * 10)))
    fit = S.powerlaw_fit(x)
    assert fit.n == 4000 and fit.n_tail >= 500
    assert fit.alpha == pytest.approx(alpha, abs=4 * (alpha - 1) / math.sqrt(fit.n_tail))
    assert fit.xmin < 3.0
    assert S.powerlaw_fit(x).as_dict() == fit.as_dict()  # deterministic


def _esd_cases() -> dict[str, torch.Tensor]:
    g = gen(41)
    return {
        "pareto_300": _pareto_samples(300, 3.0, g),
        "pareto_quantiles": pareto_quantiles(256, 2.5),
        "gaussian_mp": torch.linalg.svdvals(torch.randn(200, 100, generator=g, dtype=F64)) ** 2,
        "trained_like": torch.linalg.svdvals(trained_like(300, 200, g).double()) ** 2,
        "heavy_low_rank_tail": torch.cat([_pareto_samples(150, 2.2, g),
                                          torch.rand(150, generator=g, dtype=F64)]),
        "below_threshold": torch.cat([_pareto_samples(60, 3.0, g),
                                      torch.tensor([1e-6, 5e-6, 1e-5], dtype=F64)]),
        "ties": torch.cat([_pareto_samples(40, 3.0, g)] * 2),
        "n21": _pareto_samples(21, 3.0, g),
        "n20": _pareto_samples(20, 3.0, g),
        "n19_small": _pareto_samples(19, 3.0, g),
        "n12_small": _pareto_samples(12, 2.5, g),
        "n8_small": _pareto_samples(8, 2.5, g),
        "n5_small": _pareto_samples(5, 2.5, g),
        "n2": torch.tensor([1.0, 3.0], dtype=F64),
    }


@pytest.mark.parametrize("name", list(_esd_cases()))
def test_powerlaw_fit_matches_loop_reference(name):
    # the loop reference tries every xmin in turn (tests/reference.py): the vectorized fit must
    # pick the very same xmin and give the same alpha and KS distance
    x = _esd_cases()[name]
    for thresh in (0.0, S.WW_EVALS_THRESH):  # the package's default, WeightWatcher's floor
        alpha, xmin, D, n_tail = R.powerlaw_fit(x, thresh)
        fit = S.powerlaw_fit(x, evals_thresh=thresh)
        assert fit.xmin == xmin and fit.n_tail == n_tail
        assert fit.alpha == pytest.approx(alpha, rel=1e-12)
        assert fit.D == pytest.approx(D, rel=1e-12, abs=1e-15)
        assert fit.n == int((x > thresh).sum())
        # the row blocks of the KS computation do not change the answer
        assert S.powerlaw_fit(x, thresh, chunk_elements=1).as_dict() == fit.as_dict()


def test_powerlaw_fit_threshold_scale_and_degenerate_inputs():
    x = _pareto_samples(500, 2.5, gen(42))
    fit = S.powerlaw_fit(x)
    # scale-free by default ...
    tiny_x = x / x.max() * 1e-6
    for scaled in (S.powerlaw_fit(x * 1e-3), S.powerlaw_fit(tiny_x)):
        assert scaled.alpha == pytest.approx(fit.alpha, rel=1e-12)
        assert scaled.n_tail == fit.n_tail
    # ... WeightWatcher's absolute floor on request drops eigenvalues <= 1e-5: here all
    ww = S.powerlaw_fit(tiny_x, evals_thresh=S.WW_EVALS_THRESH)
    assert math.isnan(ww.alpha) and ww.n == 0
    # non-finite and non-positive values are dropped, not propagated
    dirty = torch.cat([x, torch.tensor([0.0, -2.0, math.nan, math.inf], dtype=F64)])
    assert S.powerlaw_fit(dirty).as_dict() == fit.as_dict()
    assert math.isnan(S.powerlaw_fit(torch.tensor([3.0])).alpha)
    assert math.isnan(S.powerlaw_fit(torch.full((10,), 2.0)).alpha)  # small sample, no spread
    # a large sample with no spread: alpha = inf, as WeightWatcher reports it
    flat = S.powerlaw_fit(torch.full((30,), 2.0))
    assert flat.alpha == math.inf and flat.D == pytest.approx(0.5)
    # the matrix-level sensor: the float64 ESD of W, the audit's rank tolerance, then the fit
    W = trained_like(120, 80, gen(43))
    eigs = R.singular_values(W) ** 2
    assert S.alpha_csn(W) == pytest.approx(R.powerlaw_fit(eigs, 0.0)[0], rel=1e-12)
    # exact scaling (a power of 2): every s^2 under 1e-5, same alpha
    assert S.alpha_csn(W * 2.0**-14) == pytest.approx(S.alpha_csn(W), rel=1e-12)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_alpha_hill_recovers_exponent_of_matrix_esd(alpha):
    # W = U diag(sqrt(x)) V^T: the ESD (eigenvalues of W^T W) is x, a power law with `alpha`
    k = 384
    x = pareto_quantiles(k, alpha)
    W = with_singular_values(512, k, x.sqrt(), gen(8)).float()
    assert S.alpha_hill(W) == pytest.approx(alpha, abs=0.15)
    assert S.alpha_csn(W) == pytest.approx(alpha, abs=0.15)  # measured: within 0.007
    assert E.spectral_metrics(W).alpha == pytest.approx(S.alpha_csn(W), rel=1e-5)
    # transposing does not change the ESD's non-zero part
    assert S.alpha_hill(W.T) == pytest.approx(S.alpha_hill(W), rel=1e-4)


def test_alpha_ignores_numerically_zero_singular_values():
    # rank 100 in 512 x 512 float32: 412 singular values are rounding noise (~1e-7 s_1). Fitting
    # them dragged the median xmin into the noise (alpha was 1.08 before the fix); the fit must
    # use the 100 real eigenvalues only, whatever the SVD's rounding.
    g = gen(13)
    W = torch.randn(512, 100, generator=g) @ torch.randn(100, 512, generator=g)
    s = torch.linalg.svdvals(W.double())  # float64 reference; keep the 100 real ones
    ref = S.powerlaw_alpha(s[:100] ** 2)
    assert S.alpha_hill(W) == pytest.approx(ref, rel=1e-4)
    assert S.alpha_hill(W.T) == pytest.approx(ref, rel=1e-4)
    assert S.farms_alpha(W) == pytest.approx(ref, rel=1e-4)  # square: one window
    assert ref > 2.0
    csn = S.powerlaw_fit(s[:100] ** 2).alpha  # the audit's alpha, same 100 eigenvalues
    assert E.spectral_metrics(W).alpha == pytest.approx(csn, rel=1e-4)
    assert S.alpha_csn(W) == pytest.approx(csn, rel=1e-4)
    assert S.alpha_csn(W.T) == pytest.approx(csn, rel=1e-4)
    # rank 1: one non-zero eigenvalue, no fit
    u = torch.randn(64, 1, generator=g)
    assert math.isnan(S.alpha_hill(u @ u.T))
    assert math.isnan(S.alpha_csn(u @ u.T))
    assert math.isnan(E.spectral_metrics(u @ u.T).alpha)
    sv = torch.tensor([4.0, 2.0, 1e-9, 0.0], dtype=F64)
    torch.testing.assert_close(S.nonzero_eigenvalues_from_sv(sv, 1e-6),
                               torch.tensor([16.0, 4.0], dtype=F64))


def test_powerlaw_alpha_degenerate_inputs():
    assert math.isnan(S.powerlaw_alpha(torch.tensor([3.0])))
    assert math.isnan(S.powerlaw_alpha(torch.full((10,), 2.0)))  # no spread in the tail
    assert math.isnan(S.powerlaw_alpha(torch.tensor([0.0, -1.0, math.nan])))
    # non-finite and non-positive values are dropped, not propagated
    x = _pareto_samples(2000, 3.0, gen(9))
    dirty = torch.cat([x, torch.tensor([0.0, -2.0, math.nan, math.inf], dtype=F64)])
    assert S.powerlaw_alpha(dirty) == pytest.approx(S.powerlaw_alpha(x))


def test_esd_is_squared_singular_values_ascending():
    W = torch.randn(30, 20, generator=gen(10))
    ref = np.sort(np.linalg.svd(W.numpy().astype(np.float64), compute_uv=False) ** 2)
    np.testing.assert_allclose(S.esd(W).numpy(), ref, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Marchenko-Pastur "looks random" statistics (spectral_guard.random_init)


@pytest.mark.parametrize("m,n,seed", [(1024, 256, 0), (512, 512, 1), (300, 1000, 2)])
def test_mp_statistics_of_gaussian_matrix_are_near_one(m, n, seed):
    # closed form: for i.i.d. entries sigma_max -> sigma (sqrt m + sqrt n) and ||W||_F^2 ->
    # sigma^2 m n, so the edge statistic -> 1; the effective rank -> the MP spectrum's, ratio 1.
    # Finite size: sigma_max sits a Tracy-Widom distance below the edge (about 1-2 % here);
    # measured over 9 draws: edge 0.981 .. 1.007, erank ratio 0.9995 .. 1.0003.
    W = torch.randn(m, n, generator=gen(500 + seed), dtype=F64) * 0.37  # any scale
    s = R.singular_values(W)
    stats = mp_spectrum_statistics(float(s[0] / np.sqrt((s**2).sum())), R.effective_rank(s),
                                   (m, n))
    assert stats is not None
    edge, erank_ratio = stats
    assert 0.95 < edge < 1.03
    assert erank_ratio == pytest.approx(1.0, abs=0.005)
    assert is_mp_like(edge, erank_ratio)
    # a trained-like (power-law) spectrum of the same shape is not MP-like: outlier directions
    T = trained_like(m, n, gen(600 + seed)).double()
    t = R.singular_values(T)
    edge_t, ratio_t = mp_spectrum_statistics(float(t[0] / np.sqrt((t**2).sum())),
                                             R.effective_rank(t), (m, n))
    assert edge_t > MP_EDGE_MAX and not is_mp_like(edge_t, ratio_t)


def test_mp_statistics_closed_form_and_min_side_cutoff():
    # e = (sigma_max / ||W||_F) sqrt(p) / (1 + sqrt(p / q)): p = 16, q = 64 gives 4 / 1.5
    assert MP_MIN_SIDE == 16
    edge, _ = mp_spectrum_statistics(0.375, 10.0, (16, 64))
    assert edge == pytest.approx(1.0, rel=1e-15)
    assert mp_spectrum_statistics(0.375, 10.0, (64, 16)) == mp_spectrum_statistics(
        0.375, 10.0, (16, 64))  # orientation-free
    # r = erank / erank(MP): proportional to the erank given
    _, r1 = mp_spectrum_statistics(0.3, 5.0, (32, 100))
    _, r2 = mp_spectrum_statistics(0.3, 10.0, (32, 100))
    assert r2 == pytest.approx(2 * r1, rel=1e-15)
    # a side just under MP_MIN_SIDE is not judged, at it is (either axis)
    for shape in [(MP_MIN_SIDE - 1, 500), (500, MP_MIN_SIDE - 1)]:
        assert mp_spectrum_statistics(0.3, 10.0, shape) is None
    for shape in [(MP_MIN_SIDE, 500), (500, MP_MIN_SIDE)]:
        assert mp_spectrum_statistics(0.3, 10.0, shape) is not None
    # the bounds are inclusive, and each statistic alone can fail the test
    assert is_mp_like(MP_EDGE_MAX, MP_ERANK_MIN)
    assert not is_mp_like(MP_EDGE_MAX * (1 + 1e-9), MP_ERANK_MIN)
    assert not is_mp_like(MP_EDGE_MAX, MP_ERANK_MIN * (1 - 1e-9))


# ----------------------------------------------------------------------------------------------
# FARMS


def test_farms_windows_geometry():
    wins = S.farms_windows((1024, 64))
    assert all(r1 - r0 == 64 and c1 - c0 == 64 for r0, r1, c0, c1 in wins)
    starts = [r0 for r0, _, _, _ in wins]
    assert starts[0] == 0 and wins[-1][1] == 1024  # covers both ends
    assert np.all(np.diff(starts) == 32)  # 50 % overlap
    assert len(wins) == 31
    # aspect 2: windows twice as tall as wide, all inside the matrix
    wins2 = S.farms_windows((300, 500), aspect=2.0)
    for r0, r1, c0, c1 in wins2:
        assert r1 - r0 == 2 * (c1 - c0) and 0 <= r0 < r1 <= 300 and 0 <= c0 < c1 <= 500
    covered = torch.zeros(300, 500, dtype=torch.bool)
    for r0, r1, c0, c1 in wins2:
        covered[r0:r1, c0:c1] = True
    assert bool(covered.all())
    assert S.farms_windows((64, 64)) == [(0, 64, 0, 64)]


def test_farms_removes_aspect_ratio_bias():
    # i.i.d. Gaussian matrices of aspect 1, 4, 16: the same "untrained" state, yet alpha_hill of
    # the full ESD grows with the aspect ratio (the Marchenko-Pastur law narrows as m/n grows).
    # FARMS fits square windows, so all three look alike. Measured (3 seeds): alpha_hill
    # ~2.1 / 3.4 / 6.0, farms_alpha 2.09 .. 2.15.
    hill, farms = [], []
    for aspect in (1, 4, 16):
        W = torch.randn(64 * aspect, 64, generator=gen(100 + aspect))
        hill.append(S.alpha_hill(W))
        farms.append(S.farms_alpha(W))
    assert hill[0] < hill[1] < hill[2]
    assert max(hill) - min(hill) > 3.0
    assert max(farms) - min(farms) < 0.2
    assert max(farms) - min(farms) < 0.1 * (max(hill) - min(hill))
    # on a square matrix FARMS is the plain fit (one window, same ESD up to a scale factor)
    assert farms[0] == pytest.approx(hill[0], rel=1e-9)


def test_farms_pooled_esd_matches_manual_computation():
    W = torch.randn(90, 40, generator=gen(11), dtype=F64)
    wins = S.farms_windows((90, 40))
    pooled = np.concatenate([
        np.linalg.svd(W[r0:r1, c0:c1].numpy(), compute_uv=False) ** 2 / (r1 - r0)
        for r0, r1, c0, c1 in wins])
    assert S.farms_alpha(W) == pytest.approx(S.powerlaw_alpha(torch.from_numpy(pooled)),
                                             rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Fiedler value


def _fiedler_reference(W: np.ndarray) -> float:
    """Independent build of the documented graph: nodes = non-zero rows, weights |cos|,
    normalized Laplacian with L_ii = 1 for nodes with edges and 0 for isolated ones."""
    W = W[np.linalg.norm(W, axis=1) > 0]
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    A = np.abs(unit @ unit.T)
    np.fill_diagonal(A, 0.0)
    d = A.sum(axis=1)
    L = np.zeros_like(A)
    m = len(d)
    for i in range(m):
        for j in range(m):
            if i == j:
                L[i, j] = 1.0 if d[i] > 0 else 0.0
            elif d[i] > 0 and d[j] > 0:
                L[i, j] = -A[i, j] / math.sqrt(d[i] * d[j])
    return float(scipy.linalg.eigh(L, eigvals_only=True)[1])


@pytest.mark.parametrize("m", [2, 3, 10])
def test_fiedler_identical_rows_is_complete_graph(m):
    row = torch.randn(1, 7, generator=gen(m))
    W = row.repeat(m, 1) * torch.linspace(0.5, 2.0, m)[:, None]  # scale does not matter
    W[0] *= -1  # |cos| makes the sign not matter either
    assert S.fiedler_value(W) == pytest.approx(m / (m - 1), rel=1e-9)


def test_fiedler_orthogonal_rows_is_zero():
    assert S.fiedler_value(torch.eye(6)) == pytest.approx(0.0, abs=1e-12)
    assert S.fiedler_value(torch.eye(6)[:4] * 5) == pytest.approx(0.0, abs=1e-12)


def test_fiedler_disconnected_blocks_is_zero():
    W = torch.zeros(8, 5)
    W[:5, 0] = torch.arange(1.0, 6.0)
    W[5:, 3] = -2.0
    assert S.fiedler_value(W) == pytest.approx(0.0, abs=1e-12)
    # and it is the same graph the reference builds
    assert S.fiedler_value(W) == pytest.approx(_fiedler_reference(W.numpy().astype(float)),
                                               abs=1e-12)


@pytest.mark.parametrize("seed,m,n,dead", [(0, 12, 20, 0), (1, 30, 8, 2), (2, 5, 50, 1)])
def test_fiedler_matches_scipy_reference(seed, m, n, dead):
    W = torch.randn(m, n, generator=gen(seed), dtype=F64)
    W[:dead] = 0.0  # zero rows are dropped from the graph
    ref = _fiedler_reference(W.numpy())
    assert S.fiedler_value(W) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert 0.0 <= S.fiedler_value(W) <= (m - dead) / (m - dead - 1) + 1e-12


def test_fiedler_collapse_reads_high():
    # the honest direction: rows collapsing onto one direction RAISE the Fiedler value
    g = gen(12)
    healthy = torch.randn(40, 256, generator=g, dtype=F64)
    direction = torch.randn(1, 256, generator=g, dtype=F64)
    collapsed = direction + 0.05 * torch.randn(40, 256, generator=g, dtype=F64)
    # measured: healthy Gaussian rows 0.81 (40 x 256) .. 0.91 (256 x 256); rows collapsing onto
    # one direction approach the complete-graph value m/(m-1) = 1.0256 from below
    assert S.fiedler_value(healthy) < 0.95
    assert S.fiedler_value(collapsed) == pytest.approx(40 / 39, rel=0.01)
    assert S.fiedler_value(collapsed) > S.fiedler_value(healthy) + 0.05
    assert math.isnan(S.fiedler_value(torch.ones(1, 4)))  # one node: undefined
