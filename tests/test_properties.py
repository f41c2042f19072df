"""Property tests (hypothesis, derandomized "ci" profile from conftest.py): the sensors are
invariant to scaling, transposition and row/column permutations, as their definitions imply."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen
from hypothesis import given
from hypothesis import strategies as st

from spectral_guard import estimators as E
from spectral_guard import sensors as S

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
SCALE_FREE = ("stable_rank", "stable_rank_ratio", "condition_number", "effective_rank",
              "effective_rank_ratio", "alpha")
SPECTRAL = SCALE_FREE + ("sigma_max", "sigma_min", "frobenius")


@st.composite
def matrices(draw, min_side: int = 2, max_side: int = 12):
    """A float64 matrix of one of four kinds, from a seed (so shrinking stays meaningful)."""
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    kind = draw(st.sampled_from(["gauss", "heavy", "ill", "low_rank"]))
    g = gen(draw(st.integers(0, 2**31 - 1)))
    W = torch.randn(m, n, generator=g, dtype=F64)
    if kind == "heavy":  # Student-t-like entries: Gaussian over a random chi scale
        W = W / torch.rand(m, n, generator=g, dtype=F64).clamp_min(0.05) ** 0.8
    elif kind == "ill":  # graded columns: kappa up to ~1e6
        W = W * torch.logspace(0, -6, n, dtype=F64)[torch.randperm(n, generator=g)]
    elif kind == "low_rank" and max(m, n) >= 4 and min(m, n) >= 2:
        # exact zero columns: rank r < min(m, n), kappa = inf. (Shapes below 4 are skipped:
        # there the float64 rank tolerance eps*sqrt(max(m, n)) is within 2x of LAPACK's noise.)
        r = draw(st.integers(1, min(m, n) - 1))
        W[:, torch.randperm(n, generator=g)[: n - r]] = 0.0
    return W


scales = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


def _same(a: float, b: float, rel: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return a == pytest.approx(b, rel=rel, abs=1e-12)


def _assert_metrics_equal(a, b, keys, rel=1e-7):
    for key in keys:
        assert _same(getattr(a, key), getattr(b, key), rel), (key, getattr(a, key),
                                                              getattr(b, key))


def _kappa_rel(W: torch.Tensor) -> float:
    # kappa and sigma_min carry the SVD's backward error amplified by kappa itself
    s = torch.linalg.svdvals(W)
    if float(s[-1]) <= S.rank_rtol(tuple(W.shape), W.dtype) * float(s[0]):
        return 1e-7
    return 1e-7 + 1e3 * torch.finfo(F64).eps * float(s[0] / s[-1])


@given(matrices(), scales)
def test_scaling_invariance(W, c):
    a = E.spectral_metrics(W)
    b = E.spectral_metrics(c * W)
    _assert_metrics_equal(a, b, ("stable_rank", "stable_rank_ratio", "effective_rank",
                                 "effective_rank_ratio", "alpha"))
    _assert_metrics_equal(a, b, ("condition_number",), rel=_kappa_rel(W))
    assert b.sigma_max == pytest.approx(c * a.sigma_max, rel=1e-9)
    assert b.frobenius == pytest.approx(c * a.frobenius, rel=1e-9)
    assert _same(S.fiedler_value(c * W), S.fiedler_value(W), 1e-7)
    assert S.hygiene(c * W) == S.hygiene(W)


@given(matrices())
def test_transposition_invariance(W):
    a = E.spectral_metrics(W)
    b = E.spectral_metrics(W.T)
    assert b.shape == (W.shape[1], W.shape[0])
    _assert_metrics_equal(a, b, ("stable_rank", "stable_rank_ratio", "effective_rank",
                                 "effective_rank_ratio", "alpha", "sigma_max", "frobenius"))
    _assert_metrics_equal(a, b, ("condition_number", "sigma_min"), rel=_kappa_rel(W))
    assert _same(S.stable_rank(W), S.stable_rank(W.T), 1e-7)
    assert _same(S.condition_number(W), S.condition_number(W.T), _kappa_rel(W))


@given(matrices(), st.integers(0, 2**31 - 1))
def test_permutation_invariance(W, seed):
    g = gen(seed)
    rp = torch.randperm(W.shape[0], generator=g)
    cp = torch.randperm(W.shape[1], generator=g)
    P = W[rp][:, cp]
    a = E.spectral_metrics(W)
    b = E.spectral_metrics(P)
    _assert_metrics_equal(a, b, tuple(k for k in SPECTRAL if k not in ("condition_number",
                                                                       "sigma_min")))
    _assert_metrics_equal(a, b, ("condition_number", "sigma_min"), rel=_kappa_rel(W))
    assert _same(S.fiedler_value(P), S.fiedler_value(W), 1e-7)
    assert S.hygiene(P) == S.hygiene(W)


@given(matrices(), st.integers(0, 2**31 - 1), st.integers(0, 6), st.integers(0, 3),
       st.booleans())
def test_hygiene_counts_permutation_invariant(W, seed, n_nan, n_inf, dead):
    g = gen(seed)
    m, n = W.shape
    W = W.clone()
    if dead:
        W[int(torch.randint(m, (1,), generator=g))] = 0.0
        W[:, int(torch.randint(n, (1,), generator=g))] = 0.0
    W[0] = W[-1] * 2.0 if m > 2 else W[0]  # maybe a duplicate pair
    flat = torch.randperm(m * n, generator=g)
    W.view(-1)[flat[:n_nan]] = math.nan
    W.view(-1)[flat[n_nan:n_nan + n_inf]] = -math.inf
    h = S.hygiene(W)
    assert (h.nan, h.inf) == (min(n_nan, m * n), min(n_inf, max(m * n - n_nan, 0)))
    rp = torch.randperm(m, generator=g)
    cp = torch.randperm(n, generator=g)
    assert S.hygiene(W[rp][:, cp]) == h
    assert S.count_nonfinite(W[rp][:, cp]) == (h.nan, h.inf)
