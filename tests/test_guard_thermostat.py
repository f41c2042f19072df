"""Thermostat law against its closed form."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_guard.guard import thermostat as th

pos = st.floats(1e-6, 1e3, allow_nan=False)


@given(x=st.floats(0, 10), t=st.floats(1e-3, 10))
def test_floor_severity_closed_form(x, t):
    sev = th.floor_severity(x, t)
    assert 0.0 <= sev <= 1.0
    if x >= t:
        assert sev == 0.0 and not th.floor_triggered(x, t)
    else:
        assert sev == pytest.approx(1 - x / t)
        assert th.floor_triggered(x, t)


@given(x=st.floats(0, 1e6), t=st.floats(1e-3, 1e3))
def test_ceiling_severity_closed_form(x, t):
    sev = th.ceiling_severity(x, t)
    assert 0.0 <= sev <= 1.0
    if x <= t:
        assert sev == 0.0 and not th.ceiling_triggered(x, t)
    else:
        assert sev == pytest.approx(1 - t / x)
        assert th.ceiling_triggered(x, t)


def test_severity_anchor_points():
    assert th.floor_severity(0.25, 0.5) == pytest.approx(0.5)
    assert th.floor_severity(0.0, 0.5) == 1.0
    assert th.ceiling_severity(20.0, 10.0) == pytest.approx(0.5)
    assert th.ceiling_severity(math.inf, 10.0) == 1.0
    assert th.floor_severity(math.nan, 0.5) == 0.0 and not th.floor_triggered(math.nan, 0.5)


@given(lam=st.floats(0, 1), sev=st.floats(0, 1), base=pos, gain=st.floats(0, 10))
def test_triggered_law(lam, sev, base, gain):
    out = th.update_lambda(lam, True, sev, base, gain, decay=0.5, floor=0.01)
    assert out == pytest.approx(base * (1 + gain * sev))
    assert base <= out <= base * (1 + gain) * (1 + 1e-12)


@given(sev=st.floats(0, 1), base=pos, gain=st.floats(0, 10), decay=st.floats(0.05, 0.95),
       floor=st.floats(1e-4, 0.5))
def test_healthy_decay_is_geometric_then_zero(sev, base, gain, decay, floor):
    lam = th.update_lambda(0.0, True, sev, base, gain, decay, floor)
    start = lam
    for n in range(1, 400):
        lam = th.update_lambda(lam, False, 0.0, base, gain, decay, floor)
        expected = start * decay**n
        if expected < floor * base * (1 - 1e-9):
            assert lam == 0.0
            break
        assert lam == pytest.approx(expected, rel=1e-9) or lam == 0.0
    assert lam == 0.0
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
                                      collapse_rule=False,
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
    cfg = guard.config
    fired = [h for h in guard.history if h["layer"] == first and h["triggered"]]
    assert [h["step"] for h in fired] == [4]
    triggered = cfg.base * (1 + cfg.gain * th.floor_severity(
        fired[0]["effective_rank_retention"], 0.9))
    # checks of this layer launch at steps 0, 4, 8, 12 and apply one step later
    assert checks == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert lams[:5] == [0.0] * 5
    assert lams[5] == pytest.approx(triggered) and lams[8] == pytest.approx(triggered)
    assert lams[9] == pytest.approx(triggered * 0.5)
    assert lams[13] == pytest.approx(triggered * 0.25)
    assert has_term == [False] * 5 + [True] * 9  # treated: its term at every step
