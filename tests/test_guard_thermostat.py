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
