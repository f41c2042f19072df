"""The alarm's quorum (guard/alarm.py): layers that collapse suddenly (the fall) or far below
their floor (the depth) count; the same layers drifting slowly just under the floor, as healthy
training's do, do not. The depth count works at any check period."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from guard_models import seeded_model

import spectral_guard
from spectral_guard.guard.alarm import (
    FALL_DEPTH,
    collapse_depth,
    collapsed_deep,
    counts_toward_quorum,
    fall_steps,
    fell_suddenly,
    remember,
    update_fall,
)
from spectral_guard.guard.check import Readings
from spectral_guard.guard.config import GuardConfig


def test_remember_keeps_the_horizon_and_fall_steps_finds_the_latest_higher_reading():
    recent: list = []
    for step, r in [(0, 1.0), (10, 0.95), (30, 0.9), (50, 0.8), (70, 0.75)]:
        recent = remember(recent, step, r, horizon=40)
    assert recent == [(30, 0.9), (50, 0.8), (70, 0.75)]          # steps >= 70 - 40
    assert remember(recent, 80, float("nan"), 40) == [(50, 0.8), (70, 0.75)]
    assert remember(recent, 80, 0.7, horizon=0) == []             # off: nothing kept
    # the trigger at 0.55: the latest reading >= 0.55 + 0.3 is step 30's 0.9
    assert FALL_DEPTH == pytest.approx(0.3)
    assert fall_steps(recent, 72, 0.55) == 42
    assert fall_steps(recent, 72, 0.5) == 22                      # 0.8 >= 0.5 + 0.3: step 50
    assert fall_steps(recent, 72, 0.65) == -1                     # nothing >= 0.95 kept
    assert fall_steps(recent, 72, float("nan")) == -1
    assert fell_suddenly(42, 60) and not fell_suddenly(61, 60) and not fell_suddenly(-1, 60)
    assert fell_suddenly(-1, 0) and fell_suddenly(500, 0)        # alarm_fall_steps=0: any layer
    # a treatment: the fall is looked for until found, kept, and forgotten when it ends
    recent, fall = [(0, 1.0)], -1
    recent, fall = update_fall(recent, fall, 10, 0.75, True, 60)   # 1.0 >= 1.05? no
    assert fall == -1 and recent == [(0, 1.0), (10, 0.75)]
    recent, fall = update_fall(recent, fall, 20, 0.6, True, 60)    # 1.0 >= 0.9 at step 0
    assert fall == 20
    recent, fall = update_fall(recent, fall, 30, 0.2, True, 60)    # found: kept as it was
    assert fall == 20
    recent, fall = update_fall(recent, fall, 40, 0.9, False, 60)   # treatment over
    assert fall == -1 and recent[-1] == (40, 0.9)


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


def test_a_sudden_collapse_of_a_quorum_raises_the_alarm_a_slow_one_does_not():
    sudden = _collapse(over=20, alarm_depth=None)   # the fall alone
    assert sudden["msigns"] > 0 and sudden["lr_scale"] < 1.0
    assert all(0 <= row["collapse_fall"] <= 60 for row in sudden["rows"])
    slow = _collapse(over=300, alarm_depth=None)   # 0.3 of retention lost in 112 steps
    assert all(row["lambda_collapse"] > 0 for row in slow["rows"])   # treated for collapse
    assert all(row["collapse_fall"] == -1 for row in slow["rows"])   # ... after a slow fall
    assert slow["msigns"] == 0                                       # no alarm, no sign
    assert slow["lr_scale"] == 1.0     # the default back-off counts what the quorum counts
    off = {"alarm_depth": None}
    # counting every treated layer, the graded back-off follows the slow fall too
    assert _collapse(over=300, lr_count="treated", **off)["lr_scale"] < 1.0
    assert _collapse(over=300, lr_policy="alarm", **off)["lr_scale"] == 1.0   # the alarm's: not
    old_rule = _collapse(over=300, alarm_fall_steps=0, **off)              # any treated layer
    assert old_rule["msigns"] > 0


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
    assert GuardConfig().alarm_depth == pytest.approx(0.15)
    assert collapsed_deep(collapse_depth(Readings(effective_rank_retention=0.425), floor), 0.15)
    assert not collapsed_deep(collapse_depth(Readings(effective_rank_retention=0.43), floor),
                              0.15)
    assert collapsed_deep(0.0, 0.0) and not collapsed_deep(0.0, 0.15)   # 0: any layer
    assert not collapsed_deep(1.0, None)                                # None: off
    # the quorum counts a layer that fell suddenly or is deep
    assert counts_toward_quorum(30, 60, 0.0, 0.15) and counts_toward_quorum(-1, 60, 0.2, 0.15)
    assert not counts_toward_quorum(-1, 60, 0.1, 0.15)
    assert not counts_toward_quorum(90, 60, 0.9, None)


def test_a_deep_collapse_raises_the_alarm_however_long_it_took():
    fast = _collapse(over=20)
    assert fast["msigns"] > 0 and fast["lr_scale"] < 1.0
    slow = _collapse(over=300)   # no sudden fall (see above), but deep: counted by depth
    assert slow["msigns"] > 0
    assert all(row["collapse_fall"] == -1 for row in slow["rows"])
    assert all(row["collapse_depth"] >= 0.15 for row in slow["rows"])
    # retention 0.2 + 0.8 (1 - t / 300) reaches 0.425 (depth 0.15) at step 216: signed at the
    # first multiple of msign_every after the check of that step was applied
    assert 216 < slow["signed_at"] <= 216 + 2 + 5


def test_a_slow_drift_just_under_the_floor_is_treated_but_raises_no_alarm():
    drift = _collapse(over=280, bottom=0.45)   # depth 1 - 0.45 / 0.5 = 0.1 < 0.15, no fall
    assert all(row["lambda_collapse"] > 0 for row in drift["rows"])   # treated for collapse
    assert all(row["collapse_depth"] == pytest.approx(0.1, abs=1e-3) for row in drift["rows"])
    assert all(row["collapse_fall"] == -1 for row in drift["rows"])
    assert drift["msigns"] == 0                                       # no alarm, no sign
    assert _collapse(over=280, bottom=0.45, alarm_depth=0.05)["msigns"] > 0
    assert _collapse(over=280, bottom=0.45, alarm_depth=0.0)["msigns"] > 0   # any layer


def test_the_alarm_fires_with_a_layer_checked_every_50_or_100_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 50 < alarm_fall_steps: no warning
        coarse = _collapse(over=20, every=50)
    assert coarse["period"] == 50
    # checks at steps 0, 50, ...: step 50's reads 0.2 (depth 0.6), applied at step 51
    assert coarse["msigns"] > 0 and 51 <= coarse["signed_at"] <= 51 + 5
    with pytest.warns(UserWarning, match="only layers collapsed alarm_depth=0.15"):
        blind = _collapse(over=20, every=100)   # no fall can be seen: the depth counts
    assert blind["period"] == 100 and blind["msigns"] > 0
    with pytest.warns(UserWarning, match="only its attention half"):
        assert _collapse(over=20, every=100, alarm_depth=None)["msigns"] == 0


def test_alarm_fall_steps_and_alarm_depth_are_checked():
    for bad in ({"alarm_fall_steps": -1}, {"alarm_depth": 1.0}, {"alarm_depth": -0.1},
                {"alarm_depth": True}, {"alarm_depth": "0.1"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            spectral_guard.instrument(seeded_model(0, n_layers=1, d=32, seq=16), **bad)


def test_a_check_period_longer_than_alarm_fall_steps_is_announced():
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    with pytest.warns(UserWarning, match="checked every 100 steps"):
        spectral_guard.instrument(model, ratio=0.01, attention=False).remove()
    quiet = [{"ratio": 0.01, "alarm_fall_steps": 0}, {"ratio": 0.01, "msign_every": 0},
             {"ratio": 0.01, "alarm_fall_steps": 100}, {}]   # {}: the defaults, every 20 steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in quiet:
            spectral_guard.instrument(model, **kw).remove()


def test_a_state_saved_before_the_depth_count_loads_and_says_so():
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    guard = spectral_guard.instrument(model, attention=False)
    state = guard.state_dict()
    assert state["config"]["alarm_depth"] == pytest.approx(0.15)
    guard.load_state_dict(state)   # the same settings: silent
    del state["config"]["alarm_depth"]   # as saved before the depth count existed
    with pytest.warns(UserWarning, match=r"alarm_depth None -> 0.15"):
        guard.load_state_dict(state)
    guard.remove()
    same = spectral_guard.instrument(model, attention=False, alarm_depth=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)   # saved without the depth count, loaded without it
    same.remove()


def test_the_alarms_former_names_still_work_and_old_states_load():
    from spectral_guard.guard.config import RENAMED

    with pytest.warns(DeprecationWarning, match="msign_quorum is now alarm_quorum"):
        cfg = GuardConfig(msign_quorum=0.2, msign_depth=None)
    assert (cfg.alarm_quorum, cfg.alarm_depth) == (0.2, None)
    with pytest.warns(DeprecationWarning, match="msign_fall is now alarm_fall_steps"):
        assert cfg.with_overrides(msign_fall=30).alarm_fall_steps == 30
    with pytest.raises(ValueError, match="alarm_quorum"):   # validated under the new name
        with pytest.warns(DeprecationWarning):
            GuardConfig(msign_quorum=2.0)
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    with pytest.warns(DeprecationWarning, match="msign_alarm is now alarm_attention_factor"):
        guard = spectral_guard.instrument(model, attention=False, msign_alarm=3.0)
    assert guard.config.alarm_attention_factor == 3.0
    state = guard.state_dict()
    for old, new in RENAMED.items():   # a state saved under the former names
        state["config"][old] = state["config"].pop(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # same settings under the old names: silent
        guard.load_state_dict(state)
    state["config"]["msign_quorum"] = 0.3
    with pytest.warns(UserWarning, match=r"alarm_quorum 0.3 -> 0.15"):
        guard.load_state_dict(state)
    guard.remove()
