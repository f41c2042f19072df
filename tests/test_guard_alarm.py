"""The alarm's fall rule (guard/alarm.py): a quorum of layers that collapse suddenly raises the
alarm; the same layers collapsing slowly, as healthy training does, do not."""

from __future__ import annotations

import warnings

import pytest
import torch
from guard_models import seeded_model

import spectral_guard
from spectral_guard.guard.alarm import (
    FALL_DEPTH,
    fall_steps,
    fell_suddenly,
    remember,
    update_fall,
)


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
    assert fell_suddenly(-1, 0) and fell_suddenly(500, 0)        # msign_fall=0: any layer
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


def _collapse(over: int, msign_fall: int = 60, steps: int = 320, **kw) -> dict:
    """Half the penalized layers' effective-rank retention falls linearly from 1 to 0.2 over
    ``over`` steps (singular vectors kept); nothing else moves."""
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=1.0, attention=False, msign_every=5,
                                      msign_fall=msign_fall, **kw)
    names = [n for n, row in guard.stats()["layers"].items() if row["penalized"]]
    chosen = names[: len(names) // 2]
    modules = dict(model.named_modules())
    weights = {n: modules[n].parametrizations.weight.original for n in chosen}
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    retention = 1.0 - 0.8 * (t / over).clamp(max=1.0)     # the schedule, step t at row t - 1
    targets = {}
    for n in chosen:   # every step's weight, computed before training
        U, s0, Vh = torch.linalg.svd(weights[n].detach().double(), full_matrices=False)
        targets[n] = ((U * _spectra_with_retention(s0, retention)[:, None, :]) @ Vh).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)   # the guard's clock; weights kept
    for i in range(steps):
        if guard.stats()["totals"]["msigns"]:
            break
        with torch.no_grad():
            for n in chosen:
                weights[n].copy_(targets[n][i])
        opt.step()
    rows = guard.stats()["layers"]
    return {"msigns": guard.stats()["totals"]["msigns"], "rows": [rows[n] for n in chosen],
            "lr_scale": guard.metrics()["lr_scale"]}


def test_a_sudden_collapse_of_a_quorum_raises_the_alarm_a_slow_one_does_not():
    sudden = _collapse(over=20)
    assert sudden["msigns"] > 0 and sudden["lr_scale"] < 1.0
    assert all(0 <= row["collapse_fall"] <= 60 for row in sudden["rows"])
    slow = _collapse(over=300)   # 0.3 of retention lost in 112 steps
    assert all(row["lambda_collapse"] > 0 for row in slow["rows"])   # treated for collapse
    assert all(row["collapse_fall"] == -1 for row in slow["rows"])   # ... after a slow fall
    assert slow["msigns"] == 0                                       # no alarm, no sign
    assert slow["lr_scale"] < 1.0      # the graded back-off follows the treated fraction
    assert _collapse(over=300, lr_policy="alarm")["lr_scale"] == 1.0   # the alarm's: not
    assert _collapse(over=300, lr_count="sudden")["lr_scale"] == 1.0   # nor sudden-only
    old_rule = _collapse(over=300, msign_fall=0)                     # any treated layer
    assert old_rule["msigns"] > 0


def test_msign_fall_is_checked():
    with pytest.raises(ValueError, match="msign_fall"):
        spectral_guard.instrument(seeded_model(0, n_layers=1, d=32, seq=16), msign_fall=-1)


def test_a_check_period_longer_than_msign_fall_is_announced():
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    with pytest.warns(UserWarning, match="checked every 100 steps"):
        spectral_guard.instrument(model, ratio=0.01, attention=False).remove()
    quiet = [{"ratio": 0.01, "msign_fall": 0}, {"ratio": 0.01, "msign_every": 0},
             {"ratio": 0.01, "msign_fall": 100}, {}]   # {}: the defaults, every 20 steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in quiet:
            spectral_guard.instrument(model, **kw).remove()
