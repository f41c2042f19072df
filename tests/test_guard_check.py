"""The check's math as pure functions, against numpy and closed forms (no Guard involved)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import reference
import torch

from spectral_guard.estimators import singular_values_at
from spectral_guard.guard.check import (
    Law,
    Readings,
    Verdict,
    baseline_from,
    condition_pairs,
    judge,
    measure,
    relative,
    update_lambdas,
)
from spectral_guard.guard.sensors import ABSOLUTE, RELATIVE
from spectral_guard.thresholds import Rule


def _low_rank(m: int, n: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, rank, generator=g) * 0.02
    B = torch.randn(rank, n, generator=g)
    return A @ B + noise * torch.randn(m, n, generator=g)


def _numpy_readings(W: np.ndarray) -> tuple[float, float, float]:
    """``(erank, stable rank, kappa)`` by numpy's float64 SVD (tests/reference.py)."""
    s = reference.singular_values(W)
    return (reference.effective_rank(s), reference.stable_rank(s),
            reference.condition_number(s))


@pytest.mark.parametrize("method", ["gram", "svd", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_singular_values_at_matches_numpy(method, dtype):
    W = _low_rank(96, 64, 64, 0.0, seed=1).to(dtype)
    ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
    s = singular_values_at(W, torch.float64, method)
    assert s.dtype == torch.float64
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-6, atol=1e-12 * ref[0])


def test_singular_values_at_ignores_the_callers_autocast():
    W = _low_rank(128, 128, 6, 2e-4)
    plain = singular_values_at(W, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = singular_values_at(W, torch.float64)
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


def test_measure_matches_numpy_and_ratios():
    W = _low_rank(80, 60, 10, 1e-3, seed=2)
    s = singular_values_at(W, torch.float64)
    r = measure(s, (80, 60), torch.float32, sigma_max=3.0, fiedler=0.5)
    erank, sr, kappa = _numpy_readings(W.numpy())
    assert r.effective_rank == pytest.approx(erank, rel=1e-9)
    assert r.stable_rank == pytest.approx(sr, rel=1e-9)
    assert r.condition_number == pytest.approx(kappa, rel=1e-6)
    assert r.effective_rank_ratio == pytest.approx(erank / 60, rel=1e-9)
    assert r.stable_rank_ratio == pytest.approx(sr / 60, rel=1e-9)
    assert (r.sigma_max, r.fiedler) == (3.0, 0.5)


def test_relative_readings_and_baseline():
    base = baseline_from(Readings(sigma_max=1.0, effective_rank=20.0, stable_rank=4.0,
                                  condition_number=10.0))
    assert base is not None
    r = relative(Readings(sigma_max=1.0, effective_rank=5.0, stable_rank=2.0,
                          condition_number=50.0), base)
    assert (r.effective_rank_retention, r.stable_rank_retention, r.condition_growth) == \
        (0.25, 0.5, 5.0)
    assert baseline_from(Readings(sigma_max=0.0, effective_rank=0.0, stable_rank=0.0)) is None
    assert math.isnan(relative(Readings(effective_rank=5.0), None).effective_rank_retention)


def test_judge_relative_floor_with_severity():
    r = Readings(sigma_max=1.0, effective_rank=3.0, effective_rank_retention=0.25)
    v = judge(r, {"effective_rank": 0.5}, Rule(), min_dim=64)
    assert v.triggered == {"collapse": True, "conditioning": False}
    assert v.severity["collapse"] == pytest.approx(1 - 0.25 / 0.5)
    assert v.reasons == ("effective_rank_retention 0.25 < 0.5",)
    healthy = dataclasses.replace(r, effective_rank_retention=0.9)
    assert not judge(healthy, {"effective_rank": 0.5}, Rule(), min_dim=64).fired


def test_judge_absolute_rule_sees_a_layer_collapsed_from_the_start():
    """Retention is 1 (the layer is as collapsed as at instrumentation): only the absolute
    rule fires, gated by collapse_min_dim exactly as in the audit."""
    W = _low_rank(128, 128, 1, 1e-6)
    s = singular_values_at(W, torch.float64)
    base = baseline_from(measure(s, (128, 128), torch.float32, 1.0))
    r = relative(measure(s, (128, 128), torch.float32, 1.0), base)
    assert r.effective_rank_retention == pytest.approx(1.0)
    rule = Rule(stable_rank_min=1.5, effective_rank_ratio_min=0.2, collapse_min_dim=8)
    v = judge(r, {"effective_rank": 0.5}, rule, min_dim=128)
    assert v.triggered["collapse"] and any("effective_rank_ratio" in x for x in v.reasons)
    assert not judge(r, {"effective_rank": 0.5}, rule, min_dim=4).fired  # below the gate
    assert not judge(r, {"effective_rank": 0.5}, rule, 128, collapse_rule=False).fired


def test_judge_ceiling_and_zero_layer():
    r = Readings(sigma_max=1.0, effective_rank=5.0, condition_growth=40.0)
    v = judge(r, {"condition_number": 10.0}, Rule(), min_dim=64)
    assert v.triggered == {"collapse": False, "conditioning": True}
    assert v.severity["conditioning"] == pytest.approx(1 - 10 / 40)
    assert judge(Readings(sigma_max=0.0, effective_rank=0.0), {"effective_rank": 2.0},
                 Rule(effective_rank_ratio_min=0.5), 64) == Verdict()


def test_update_lambdas_per_kind():
    law = Law(base=0.05, gain=4.0, decay=0.5, floor=0.01)
    v = Verdict({"collapse": True, "conditioning": False}, {"collapse": 0.5,
                                                           "conditioning": 0.0})
    lam = update_lambdas({"collapse": 0.0, "conditioning": 0.1}, v, law)
    assert lam == {"collapse": pytest.approx(0.05 * 3), "conditioning": pytest.approx(0.05)}


def test_condition_pairs_select_the_violating_directions():
    s = torch.tensor([10.0, 5.0, 0.5, 0.01], dtype=torch.float64)
    U, V = torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    pairs = condition_pairs(U, s, V, kappa_max=15.0)
    eps = 1e-3 * 10.0
    keep = [i for i in range(4) if math.log(10 + eps) - math.log(float(s[i]) + eps)
            > math.log(15.0)]
    assert pairs is not None and keep == [2, 3]
    assert pairs.U.shape == (4, 3) and torch.equal(pairs.U[:, 0], U[:, 0])
    assert condition_pairs(U, s, V, kappa_max=1e9) is None
    assert condition_pairs(U, s, V, kappa_max=math.inf) is None


def test_registry_names_real_rule_fields_and_readings():
    rule_fields = {f.name for f in dataclasses.fields(Rule)}
    reading_fields = {f.name for f in dataclasses.fields(Readings)}
    for sensor in [*RELATIVE.values(), *ABSOLUTE]:
        assert sensor.field in rule_fields and sensor.reading in reading_fields
        assert sensor.bound in ("floor", "ceiling") and sensor.kind in ("collapse",
                                                                        "conditioning")
