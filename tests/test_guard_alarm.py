"""The alarm's depth rule (guard/alarm.py): a quorum of layers collapsed far below their floor
raises the alarm, however long the fall took and however rarely a layer is checked; layers that
drift just under the floor, as healthy training's do, do not."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from guard_models import seeded_model

import spectral_guard
from spectral_guard.guard.alarm import collapse_depth, collapsed_deep
from spectral_guard.guard.check import Readings
from spectral_guard.guard.config import GuardConfig


def test_collapse_depth_is_the_deepest_relative_floor_severity():
    floor = {"effective_rank": 0.5}
    # 1 - 0.4 / 0.5 = 0.2; at or above the floor: 0
    assert collapse_depth(Readings(effective_rank_retention=0.4), floor) == pytest.approx(0.2)
    assert collapse_depth(Readings(effective_rank_retention=0.5), floor) == 0.0
    assert collapse_depth(Readings(effective_rank_retention=0.9), floor) == 0.0
    assert collapse_depth(Readings(effective_rank_retention=math.nan), floor) == 0.0
    # the deepest of the relative collapse floors: stable rank 1 - 0.15 / 0.6 = 0.75
    both = {"effective_rank": 0.5, "stable_rank": 0.6}
    r = Readings(effective_rank_retention=0.45, stable_rank_retention=0.15)
    assert collapse_depth(r, both) == pytest.approx(0.75)
    # a ceiling (conditioning) or an absolute reading is no collapse depth
    r = Readings(effective_rank_retention=0.45, condition_growth=1e6, stable_rank=1.0)
    assert collapse_depth(r, {"effective_rank": 0.5, "condition_number": 10.0}) == \
        pytest.approx(0.1)
    assert collapse_depth(Readings(effective_rank_retention=0.1), {}) == 0.0
    # the default limit 0.15 at the default floor 0.5: retention 0.425 counts, 0.43 does not
    assert GuardConfig().msign_depth == pytest.approx(0.15)
    assert collapsed_deep(collapse_depth(Readings(effective_rank_retention=0.425), floor), 0.15)
    assert not collapsed_deep(collapse_depth(Readings(effective_rank_retention=0.43), floor),
                              0.15)
    assert collapsed_deep(0.0, 0.0) and not collapsed_deep(0.0, 0.15)   # 0: any layer


def _effective_rank(s: torch.Tensor) -> torch.Tensor:
    """Roy-Vetterli effective rank of each row of singular values."""
    p = s / s.sum(-1, keepdim=True)
    return torch.exp(-(p * torch.log(p)).sum(-1))


def _spectra_with_retention(s0: torch.Tensor, retention: torch.Tensor) -> torch.Tensor:
    """One row of singular values ``[s_1, c, ..., c]`` per entry of ``retention`` (same largest
    value as ``s0``) whose effective rank is that retention times ``s0``'s: each ``c`` by
    bisection (the effective rank grows with ``c``), all rows at once."""
    target = retention * _effective_rank(s0)
    lo, hi = torch.zeros_like(retention), torch.full_like(retention, float(s0[0]))
    for _ in range(60):
        c = (lo + hi) / 2
        s = c[:, None].expand(-1, s0.numel()).clone()
        s[:, 0] = s0[0]
        below = _effective_rank(s) < target
        lo, hi = torch.where(below, c, lo), torch.where(below, hi, c)
    return s


def _collapse(over: int, bottom: float = 0.2, steps: int = 320, **kw) -> dict:
    """Half the penalized layers' effective-rank retention falls linearly from 1 to ``bottom``
    over ``over`` steps (singular vectors kept); nothing else moves."""
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    kw = {"ratio": 1.0, "attention": False, "msign_every": 5, **kw}
    guard = spectral_guard.instrument(model, **kw)
    names = [n for n, row in guard.stats()["layers"].items() if row["penalized"]]
    chosen = names[: len(names) // 2]
    modules = dict(model.named_modules())
    weights = {n: modules[n].parametrizations.weight.original for n in chosen}
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    retention = 1.0 - (1.0 - bottom) * (t / over).clamp(max=1.0)   # step t at row t - 1
    targets = {}
    for n in chosen:   # every step's weight, computed before training
        U, s0, Vh = torch.linalg.svd(weights[n].detach().double(), full_matrices=False)
        targets[n] = ((U * _spectra_with_retention(s0, retention)[:, None, :]) @ Vh).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)   # the guard's clock; weights kept
    signed_at = -1
    for i in range(steps):
        if guard.stats()["totals"]["msigns"]:
            signed_at = guard.global_step
            break
        with torch.no_grad():
            for n in chosen:
                weights[n].copy_(targets[n][i])
        opt.step()
    rows = guard.stats()["layers"]
    return {"msigns": guard.stats()["totals"]["msigns"], "rows": [rows[n] for n in chosen],
            "lr_scale": guard.metrics()["lr_scale"], "signed_at": signed_at,
            "period": guard.config.check_period}


def test_a_deep_collapse_raises_the_alarm_however_long_it_took():
    fast = _collapse(over=20)
    assert fast["msigns"] > 0 and fast["lr_scale"] < 1.0
    assert all(row["collapse_depth"] >= 0.15 for row in fast["rows"])
    slow = _collapse(over=300)   # the same depth, 15 times slower: the law counts no time
    assert slow["msigns"] > 0
    # retention 0.2 + 0.8 (1 - t / 300) reaches 0.425 (depth 0.15) at step 216: signed at the
    # first multiple of msign_every after the check of that step was applied
    assert 216 < slow["signed_at"] <= 216 + 2 + 5


def test_a_drift_just_under_the_floor_is_treated_but_raises_no_alarm():
    drift = _collapse(over=100, bottom=0.45)   # depth 1 - 0.45 / 0.5 = 0.1 < 0.15
    assert all(row["lambda_collapse"] > 0 for row in drift["rows"])   # treated for collapse
    assert all(row["collapse_depth"] == pytest.approx(0.1, abs=1e-3) for row in drift["rows"])
    assert drift["msigns"] == 0                                       # no alarm, no sign
    assert drift["lr_scale"] < 1.0      # the graded back-off follows the treated fraction
    assert _collapse(over=100, bottom=0.45, lr_policy="alarm")["lr_scale"] == 1.0
    assert _collapse(over=100, bottom=0.45, lr_count="sudden")["lr_scale"] == 1.0
    assert _collapse(over=100, bottom=0.45, msign_depth=0.05)["msigns"] > 0
    assert _collapse(over=100, bottom=0.45, msign_depth=0.0)["msigns"] > 0   # any layer


def test_the_alarm_fires_with_a_layer_checked_every_50_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no warning that the alarm is blind at this period
        coarse = _collapse(over=20, every=50)
    assert coarse["period"] == 50
    # checks at steps 0, 50, ...: step 50's reads 0.2 (depth 0.6), applied at step 51
    assert coarse["msigns"] > 0 and 51 <= coarse["signed_at"] <= 51 + 5
    sparse = _collapse(over=100, ratio=0.02, msign_every=10, steps=400)   # period 50 by ratio
    assert sparse["period"] == 50 and sparse["msigns"] > 0


def test_msign_fall_is_deprecated_and_msign_depth_checked():
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    with pytest.raises(ValueError, match="msign_fall"):
        spectral_guard.instrument(model, msign_fall=-1)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="msign_depth"):
            spectral_guard.instrument(model, msign_depth=bad)
    with pytest.warns(DeprecationWarning, match="msign_fall is deprecated"):
        config = GuardConfig(msign_fall=60)
    assert config.msign_depth == pytest.approx(0.15) and config.msign_fall is None
    with pytest.warns(DeprecationWarning, match="msign_depth=0"):
        assert GuardConfig(msign_fall=0).msign_depth == 0.0   # "any layer", as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuardConfig().with_overrides(msign_depth=0.2)   # nothing to retire again


def test_a_state_saved_with_the_fall_rule_loads():
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    guard = spectral_guard.instrument(model, attention=False)
    state = guard.state_dict()
    state["config"].pop("msign_depth")
    state["config"]["msign_fall"] = 60            # what states saved before item 2 held
    for saved in state["layers"].values():
        saved["state"].update(recent_retention=[[0, 1.0]], collapse_fall=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # the same alarm settings: no warning
        guard.load_state_dict(state)
    state["config"]["msign_fall"] = 0             # "any layer": msign_depth 0 -> 0.15
    with pytest.warns(UserWarning, match="msign_depth 0.0 -> 0.15"):
        guard.load_state_dict(state)
