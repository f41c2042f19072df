"""The learning-rate back-off (guard/backoff.py), its "alarm" policy (the graded one:
tests/test_guard_graded.py): the scale law, its application around one
optimizer step (float and tensor ``lr``), the alarm that drives it, and its state."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from guard_models import byte_batches, seeded_model, synthetic_text

import spectral_guard
from spectral_guard.guard.backoff import LRBackoff


def _model() -> torch.nn.Module:
    return seeded_model(0, n_layers=1, d=32, heads=2, seq=16)


def _batches(n: int, seed: int = 0) -> list:
    return list(byte_batches(synthetic_text(4000, seed), 4, 16, n, seed=seed))


def test_the_scale_halves_at_each_alarm_down_to_the_floor():
    b = LRBackoff(factor=0.5, floor=0.25)
    assert b.enabled and b.scale == 1.0
    seen = []
    for _ in range(4):
        b.on_alarm()
        seen.append(b.scale)
    assert seen == [0.5, 0.25, 0.25, 0.25]
    assert b.backoffs == 2                      # the floor is not a back-off
    off = LRBackoff(factor=1.0, floor=0.25)
    off.on_alarm()
    assert not off.enabled and off.scale == 1.0 and off.backoffs == 0


def test_the_step_is_scaled_and_every_lr_put_back_float_and_tensor():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    lr_tensor = torch.tensor(0.1)
    opt = torch.optim.SGD([{"params": [w], "lr": 0.2}, {"params": [b], "lr": lr_tensor}])
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    w0, b0 = w.detach().clone(), b.detach().clone()
    backoff = LRBackoff(0.5, 0.25)
    for _ in range(2):
        backoff.on_alarm()                                      # s = 0.25
    backoff.before_step(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step()
    backoff.after_step()
    assert opt.param_groups[0]["lr"] == 0.2                   # exactly the value it had
    assert opt.param_groups[1]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(0.1)
    torch.testing.assert_close(w.detach(), w0 - 0.25 * 0.2)    # SGD: w - s lr g, g = 1
    torch.testing.assert_close(b.detach(), b0 - 0.25 * 0.1)


def _force_alarm(guard) -> None:
    """What the alarm does at a signing step (the real alarm: test_the_alarm_backs_off...)."""
    guard.backoff.on_alarm()


def test_a_backed_off_guard_steps_like_plain_training_at_the_scaled_lr():
    """Same model, same batches: the guarded run with s = 0.5 and a plain run whose LambdaLR
    schedule is halved take the same steps; the guarded optimizer's lr reads unscaled."""
    batches = _batches(6)
    guarded, plain = _model(), _model()
    guard = spectral_guard.instrument(guarded, lr_policy="alarm", attention=False,
                                      msign_every=0, ratio=0.05)
    _force_alarm(guard)
    opt_g = torch.optim.SGD(guarded.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda t: 1.0 / (1 + t))
    sched_p = torch.optim.lr_scheduler.LambdaLR(opt_p, lambda t: 0.5 / (1 + t))
    for x, y in batches:
        for model, opt, sched in ((guarded, opt_g, sched_g), (plain, opt_p, sched_p)):
            model(x, y)["loss"].backward()   # healthy: the guard adds no term
            opt.step()
            opt.zero_grad()
            sched.step()
    assert opt_g.param_groups[0]["lr"] == pytest.approx(0.1 / 7)   # the schedule's own value
    assert guard.metrics()["treated_layers"] == 0
    guard.remove()
    for (name, p), q in zip(guarded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_only_the_followed_optimizer_is_scaled():
    model = _model()
    other = torch.nn.Parameter(torch.zeros(3))
    guard = spectral_guard.instrument(model, lr_policy="alarm", attention=False, msign_every=0)
    _force_alarm(guard)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    side = torch.optim.SGD([other], lr=1.0)
    other.grad = torch.ones(3)
    side.step()
    torch.testing.assert_close(other.detach(), -torch.ones(3))       # lr 1, not 0.5
    guard.attach(side)   # now the guard follows `side` only
    other.grad = torch.ones(3)
    side.step()
    torch.testing.assert_close(other.detach(), -1.5 * torch.ones(3))
    assert opt.param_groups[0]["lr"] == 0.1 and side.param_groups[0]["lr"] == 1.0


def test_the_alarm_backs_off_a_run_that_keeps_collapsing_and_a_healthy_run_is_untouched():
    # the attention target no pair can meet: the alarm is raised from the first reading
    alarmed, healthy = _model(), _model()
    g_alarm = spectral_guard.instrument(alarmed, lr_policy="alarm", msign_every=2,
                                        attention_max_scale=1e-6)
    g_healthy = spectral_guard.instrument(healthy, lr_policy="alarm", msign_every=2)
    for model in (alarmed, healthy):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for x, y in _batches(6):
            model(x, y)["loss"].backward()
            opt.step()
            opt.zero_grad()
        assert opt.param_groups[0]["lr"] == 1e-3
    assert g_alarm.metrics()["msigns"] > 0
    assert g_alarm.stats()["totals"]["lr_backoffs"] == 2      # steps 2 and 4; floor at 6
    assert g_alarm.metrics()["lr_scale"] == 0.25
    assert g_healthy.metrics()["lr_scale"] == 1.0 and g_healthy.metrics()["msigns"] == 0
    off = _model()
    g_off = spectral_guard.instrument(off, lr_policy="alarm", msign_every=2,
                                      attention_max_scale=1e-6, lr_backoff=1.0)
    opt = torch.optim.AdamW(off.parameters(), lr=1e-3)
    for x, y in _batches(4):
        off(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert g_off.metrics()["msigns"] > 0 and g_off.metrics()["lr_scale"] == 1.0


def test_scale_lives_in_the_guard_state_and_copies():
    model = _model()
    guard = spectral_guard.instrument(model, lr_policy="alarm", attention=False)
    _force_alarm(guard)
    state = guard.state_dict()
    assert state["lr_backoff"] == {"scale": 0.5, "backoffs": 1, "updated_step": None}
    assert state["config"]["lr_backoff"] == 0.5 and state["config"]["lr_floor"] == 0.25
    guard.remove()
    fresh = spectral_guard.instrument(model, lr_policy="alarm", attention=False)
    fresh.load_state_dict(state)
    assert fresh.metrics()["lr_scale"] == 0.5
    old = {k: v for k, v in state.items() if k != "lr_backoff"}       # saved before the back-off
    old["config"] = {k: v for k, v in state["config"].items() if not k.startswith("lr_")}
    with pytest.warns(UserWarning, match="lr_backoff 1.0 -> 0.5"):
        fresh.load_state_dict(old)
    assert fresh.metrics()["lr_scale"] == 1.0
    _force_alarm(fresh)
    twin_model = copy.deepcopy(model)          # an EMA copy: its own guard, its own hooks
    assert twin_model._spectral_guard.metrics()["lr_scale"] == 0.5
    opt = torch.optim.SGD(twin_model.parameters(), lr=0.2)
    before = [p.detach().clone() for p in twin_model.parameters()]
    for p in twin_model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.2
    for p, p0 in zip(twin_model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1)   # s lr = 0.5 * 0.2


@pytest.mark.parametrize("kw, match", [({"lr_backoff": 0.0}, "lr_backoff"),
                                       ({"lr_backoff": 1.5}, "lr_backoff"),
                                       ({"lr_floor": 0.0}, "lr_floor")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        spectral_guard.instrument(_model(), **kw)


class _RaisingAdamW(torch.optim.AdamW):
    """A real optimizer whose step raises when told to (a NaN check, an out-of-memory error)
    after reading its lr: the guard's post-hook never runs."""

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        self.fail = False
        self.seen: list[float] = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        if self.fail:
            raise FloatingPointError("non-finite gradient")
        return super().step(closure)


def _raise_once(guard, model, opt, batch) -> None:
    x, y = batch
    model(x, y)["loss"].backward()
    opt.fail = True
    with pytest.raises(FloatingPointError):
        opt.step()
    opt.fail = False
    opt.zero_grad()


@pytest.mark.parametrize("then", ["forward", "step", "remove", "stats"])
def test_a_step_that_raises_leaves_the_lr_scaled_only_until_the_guard_next_runs(then):
    """lr 0.05, back-off scale 0.5: the raising step saw 0.025; the lr is 0.05 again at the
    next touch point (training forward, next step's pre-hook, stats(), remove()) and the scale
    never compounds (the next step sees 0.025, not 0.0125)."""
    model = _model()
    guard = spectral_guard.instrument(model, lr_policy="alarm", attention=False, msign_every=0)
    _force_alarm(guard)                                               # s = 0.5
    opt = _RaisingAdamW(model.parameters(), lr=0.05)
    batches = _batches(4)
    _raise_once(guard, model, opt, batches[0])
    _raise_once(guard, model, opt, batches[1])                        # twice: no compounding
    assert opt.seen == [0.025, 0.025]
    if then == "forward":
        x, y = batches[2]
        model(x, y)
        assert opt.param_groups[0]["lr"] == 0.05
    elif then == "stats":
        guard.stats()
        assert opt.param_groups[0]["lr"] == 0.05
    elif then == "step":
        x, y = batches[2]
        model(x, y)["loss"].backward()
        opt.step()
        assert opt.seen[-1] == 0.025 and opt.param_groups[0]["lr"] == 0.05
    else:
        guard.remove()
        assert opt.param_groups[0]["lr"] == 0.05
        x, y = batches[2]
        model(x, y)["loss"].backward()
        opt.step()                                                    # unguarded: unscaled
        assert opt.seen[-1] == 0.05 and opt.param_groups[0]["lr"] == 0.05


def test_a_value_set_by_someone_else_after_a_raising_step_is_kept():
    model = _model()
    guard = spectral_guard.instrument(model, lr_policy="alarm", attention=False, msign_every=0)
    _force_alarm(guard)
    opt = _RaisingAdamW(model.parameters(), lr=0.05)
    _raise_once(guard, model, opt, _batches(1)[0])
    opt.param_groups[0]["lr"] = 0.01            # e.g. the user's own schedule after the error
    guard.stats()
    assert opt.param_groups[0]["lr"] == 0.01


def test_a_second_optimizer_on_guarded_weights_warns_once():
    model = _model()
    guard = spectral_guard.instrument(model, lr_policy="alarm", attention=False, msign_every=0)
    params = list(model.parameters())
    a = torch.optim.SGD(params[: len(params) // 2], lr=0.01)
    b = torch.optim.SGD(params[len(params) // 2:], lr=0.01)
    x, y = _batches(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(x, y)["loss"].backward()
            a.step()
            b.step()
    twice = [w for w in caught if "two optimizers" in str(w.message)]
    assert len(twice) == 1 and guard.global_step == 6
