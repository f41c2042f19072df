"""Thermostat law against its closed form."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_guard.guard import thermostat as th


@given(x=st.floats(0, 10), t=st.floats(1e-3, 10))
def test_floor_severity_is_in_unit_range_and_zero_exactly_when_not_triggered(x, t):
    sev = th.floor_severity(x, t)
    assert 0.0 <= sev <= 1.0
    assert th.floor_triggered(x, t) == (x < t)
    if x >= t:
        assert sev == 0.0
    else:
        assert sev > 0.0 or x / t == 1.0   # 1 - x / t rounds to 0 only at the threshold
    assert th.floor_severity(x / 2, t) >= sev     # a lower reading is at least as severe


@given(x=st.floats(0, 1e6), t=st.floats(1e-3, 1e3))
def test_ceiling_severity_is_in_unit_range_and_zero_exactly_when_not_triggered(x, t):
    sev = th.ceiling_severity(x, t)
    assert 0.0 <= sev <= 1.0
    assert th.ceiling_triggered(x, t) == (x > t)
    if x <= t:
        assert sev == 0.0
    else:
        assert sev > 0.0 or t / x == 1.0   # 1 - t / x rounds to 0 only at the threshold
    assert th.ceiling_severity(2 * x, t) >= sev   # a higher reading is at least as severe


@pytest.mark.parametrize(("x", "t", "expected"), [
    (0.3, 0.4, 0.25),    # 1 - 0.3 / 0.4 = 1 - 0.75
    (0.25, 0.5, 0.5),    # 1 - 0.25 / 0.5
    (0.45, 0.9, 0.5),    # 1 - 0.45 / 0.9
    (0.72, 0.9, 0.2),    # 1 - 0.72 / 0.9 = 1 - 0.8
    (0.0, 0.5, 1.0),     # at 0: the whole way down
    (0.5, 0.5, 0.0),     # at the threshold: healthy
    (0.7, 0.5, 0.0),     # above a floor: healthy
])
def test_floor_severity_values(x, t, expected):
    assert th.floor_severity(x, t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("x", "t", "expected"), [
    (20.0, 10.0, 0.5),   # 1 - 10 / 20
    (40.0, 10.0, 0.75),  # 1 - 10 / 40
    (12.5, 10.0, 0.2),   # 1 - 10 / 12.5 = 1 - 0.8
    (10.0, 10.0, 0.0),   # at the threshold: healthy
    (3.0, 10.0, 0.0),    # under a ceiling: healthy
    (math.inf, 10.0, 1.0),
])
def test_ceiling_severity_values(x, t, expected):
    assert th.ceiling_severity(x, t) == pytest.approx(expected, abs=1e-12)


def test_a_nan_reading_is_neither_severe_nor_triggered():
    assert th.floor_severity(math.nan, 0.5) == 0.0 and not th.floor_triggered(math.nan, 0.5)
    assert th.ceiling_severity(math.nan, 10.0) == 0.0
    assert not th.ceiling_triggered(math.nan, 10.0)


@pytest.mark.parametrize(("lam", "sev", "base", "gain", "expected"), [
    (0.0, 0.25, 0.05, 4.0, 0.1),    # 0.05 * (1 + 4 * 0.25) = 0.05 * 2
    (0.3, 0.25, 0.05, 4.0, 0.1),    # the previous lambda does not matter when triggered
    (0.0, 0.0, 0.05, 4.0, 0.05),    # 0.05 * (1 + 0)
    (0.0, 1.0, 0.05, 4.0, 0.25),    # 0.05 * (1 + 4)
    (0.0, 1.5, 0.05, 4.0, 0.25),    # severity clipped to 1: 0.05 * 5
    (0.0, 0.5, 1e-4, 2.0, 2e-4),    # 1e-4 * (1 + 2 * 0.5)
])
def test_triggered_lambda_values(lam, sev, base, gain, expected):
    out = th.update_lambda(lam, True, sev, base, gain, decay=0.5, floor=0.01)
    assert out == pytest.approx(expected, rel=1e-12)


def test_healthy_checks_halve_lambda_then_snap_it_to_zero():
    # base 0.05, floor 0.01: snapped to 0 once under 0.01 * 0.05 = 5e-4. From 0.1, halving:
    # 0.05, 0.025, 0.0125, 0.00625, 0.003125, 0.0015625, 0.00078125, then 0.000390625 < 5e-4
    expected = [0.05, 0.025, 0.0125, 0.00625, 0.003125, 0.0015625, 0.00078125, 0.0, 0.0]
    lam, seen = 0.1, []
    for _ in expected:
        lam = th.update_lambda(lam, False, 0.0, 0.05, 4.0, 0.5, 0.01)
        seen.append(lam)
    assert seen == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_healthy_decay_with_another_rate():
    # base 1, decay 0.8, floor 0.3: from 1.0: 0.8, 0.64, 0.512, 0.4096, 0.32768, then
    # 0.262144 < 0.3 -> 0
    expected = [0.8, 0.64, 0.512, 0.4096, 0.32768, 0.0]
    lam, seen = 1.0, []
    for _ in expected:
        lam = th.update_lambda(lam, False, 0.0, 1.0, 4.0, 0.8, 0.3)
        seen.append(lam)
    assert seen == pytest.approx(expected, rel=1e-12, abs=0.0)


@given(sev=st.floats(0, 1), base=st.floats(1e-6, 1e3), gain=st.floats(0, 10),
       decay=st.floats(0.05, 0.95), floor=st.floats(1e-4, 0.5))
def test_healthy_decay_is_geometric_then_zero(sev, base, gain, decay, floor):
    lam = th.update_lambda(0.0, True, sev, base, gain, decay, floor)
    start, cut = lam, floor * base
    for n in range(1, 400):
        lam = th.update_lambda(lam, False, 0.0, base, gain, decay, floor)
        expected = start * decay**n
        if abs(expected - cut) <= 1e-9 * cut:   # at the cut within rounding: either is right
            break
        if expected < cut:
            assert lam == 0.0
            break
        assert lam == pytest.approx(expected, rel=1e-9)   # never 0 while above the cut
    assert th.update_lambda(0.0, False, 0.0, base, gain, decay, floor) == 0.0


def test_guard_lambda_follows_the_law_across_checks():
    """In a guard: a check that fires sets base (1 + gain sev) one step after it was launched;
    healthy checks halve it; between its checks a treated layer still gets its term; every=2
    checks on even steps only."""
    import torch
    from guard_models import byte_batches, seeded_model, synthetic_text, thresholds

    import spectral_guard

    model = seeded_model(0, n_layers=1, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=0.5, every=2, auto_loss=False,
                                      collapse_rule=False, lambda_base=0.05, gain=4.0,
                                      decay=0.5,
                                      thresholds=thresholds(effective_rank_retention_min=0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed between our edits
    batches = list(byte_batches(synthetic_text(3000), 2, 16, 14))
    first = guard.sampled_layers(0)[0]
    module = dict(model.named_modules())[first]
    W = module.parametrizations.weight.original
    healthy = W.detach().clone()
    with torch.no_grad():  # rank 1: the check at step 4 (the layer's second) will fire
        W.copy_(torch.outer(healthy[:, 0], healthy[0]))
    lams, checks, has_term = [], [], []
    for step, (x, y) in enumerate(batches):
        if step == 6:  # healthy again before the check of step 8
            with torch.no_grad():
                W.copy_(healthy)
        model(x, y)
        pen = guard.penalty()
        grad = torch.autograd.grad(pen, W, allow_unused=True)[0] if pen.requires_grad else None
        has_term.append(grad is not None and bool(grad.abs().sum() > 0))
        row = guard.stats()["layers"][first]
        lams.append(row["lambda_collapse"])
        checks.append(row["checks"])
        opt.step()
    fired = [h for h in guard.history if h["layer"] == first and h["triggered"]]
    assert [h["step"] for h in fired] == [4]
    retention = fired[0]["effective_rank_retention"]   # the reading of the rank-1 layer
    assert 0.0 < retention < 0.9
    triggered = 0.05 * (1 + 4.0 * (1 - retention / 0.9))   # base (1 + gain severity)
    # checks of this layer launch at steps 0, 4, 8, 12 and apply one step later
    assert checks == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert lams[:5] == [0.0] * 5
    assert lams[5] == pytest.approx(triggered) and lams[8] == pytest.approx(triggered)
    assert lams[9] == pytest.approx(triggered * 0.5)
    assert lams[13] == pytest.approx(triggered * 0.25)
    assert has_term == [False] * 5 + [True] * 9  # treated: its term at every step
