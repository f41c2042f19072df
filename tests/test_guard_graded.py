"""Issue 18: the graded, reversible learning-rate back-off (guard/backoff.py), the log lines and
metrics that show the guard's interventions (guard/signs.py, guard/stats.py), a layer collapsed
at instrumentation treated from the first step, ``guard.history`` in the guard's state."""

from __future__ import annotations

import logging

import pytest
import torch
from guard_models import byte_batches, seeded_model, synthetic_text

import spectral_guard
from spectral_guard.guard.backoff import LRBackoff, graded_scale, graded_target

pytestmark = pytest.mark.usefixtures("single_thread")


def _model() -> torch.nn.Module:
    return seeded_model(0, n_layers=1, d=32, heads=2, seq=16)


def _train(model, steps: int, lr: float = 1e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for x, y in byte_batches(synthetic_text(4000, 0), 4, 16, steps, seed=0):
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()


# -- the law -------------------------------------------------------------------------------------


def test_the_graded_law_drops_at_once_and_doubles_back_per_recovery_periods():
    assert graded_target(0.0, 0.15, 0.25) == 1.0                       # healthy: untouched
    assert graded_target(0.15, 0.15, 0.25) == pytest.approx(0.5)       # the quorum: one halving
    assert graded_target(0.9, 0.15, 0.25) == 0.25                      # the floor
    assert graded_target(0.3, 0.15, 0.25, factor=1.0) == 1.0           # lr_backoff=1: off
    s = graded_scale(0.3, 0.15, 0.25, scale=1.0, periods=0.0)          # down at once
    assert s == pytest.approx(0.25)
    s = graded_scale(0.0, 0.15, 0.25, scale=s, periods=25.0)           # 25 healthy periods: 2x
    assert s == pytest.approx(0.5)
    assert graded_scale(0.0, 0.15, 0.25, scale=0.5, periods=100.0) == 1.0   # never above target
    assert graded_scale(0.0, 0.15, 0.25, scale=0.5, periods=100.0, recovery=0.0) == 0.5
    assert graded_scale(0.15, 0.15, 0.25, scale=0.3, periods=25.0) == pytest.approx(0.5)


def test_the_graded_backoff_counts_layers_beyond_the_grace_and_an_alarm_as_the_quorum():
    b = LRBackoff(0.5, 0.25, policy="graded", recovery=25, grace=1)
    b.on_check(1, 20, 0.15, step=1, check_period=20)         # one layer: inside the grace
    assert b.scale == 1.0 and b.backoffs == 0
    b.on_check(4, 20, 0.15, step=2, check_period=20)         # 3 of 20 counted: f = q
    assert b.scale == pytest.approx(0.5) and b.backoffs == 1
    for step in range(3, 3 + 25 * 20):                       # 25 check periods, healthy
        b.on_check(0, 20, 0.15, step=step, check_period=20)
    assert b.scale == pytest.approx(1.0)
    b.on_alarm()                                             # e.g. the attention half
    b.on_check(0, 20, 0.15, step=1000, check_period=20)
    assert b.scale == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_policy"):
        LRBackoff(0.5, 0.25, policy="sometimes")


# -- what users see ------------------------------------------------------------------------------


def test_the_first_intervention_is_a_warning_that_says_what_and_how_to_turn_it_off(caplog):
    model = _model()   # the attention target no pair can meet: the alarm is raised at once
    guard = spectral_guard.instrument(model, msign_every=2, attention_max_scale=1e-6)
    with caplog.at_level(logging.INFO, logger="spectral_guard"):
        _train(model, 6)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "spectral_guard"
    text = warnings[0].getMessage()
    for part in ("alarm (attention", "signed", "blocks.0.q_proj", "lr scale 1 -> 0.5",
                 "msign_every=0", "lr_backoff=1.0"):
        assert part in text, (part, text)
    m = guard.metrics()
    assert m["alarm"] == 1.0 and m["alarm_signs"] >= 2 and m["lr_scale"] < 1.0
    assert m["lr_backoffs"] >= 1
    totals = guard.stats()["totals"]
    assert totals["alarm_reason"].startswith("attention") and totals["lr_policy"] == "graded"


def _quiet_guard():
    """A guard whose log lines the tests drive by hand (no sign, no attention)."""
    return spectral_guard.instrument(_model(), attention=False, msign_every=0)


def test_later_changes_of_the_scale_are_info_lines(caplog):
    guard = _quiet_guard()
    signs = guard.signs
    with caplog.at_level(logging.INFO, logger="spectral_guard"):
        guard.backoff.scale = 0.25
        signs.announce(5, [], [], 6)
        guard.backoff.scale = 0.26                           # too small a move: no line
        signs.announce(6, [], [], 6)
        guard.backoff.scale = 1.0                            # back to full: a line
        signs.announce(7, [], [], 6)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [lv for lv, _ in levels] == [logging.WARNING, logging.INFO]
    assert "lr scale 0.25 -> 1" in levels[1][1]


def test_a_healthy_run_logs_nothing_and_reports_no_alarm(caplog):
    model = _model()
    guard = spectral_guard.instrument(model)
    with caplog.at_level(logging.INFO, logger="spectral_guard"):
        _train(model, 4)
    assert not caplog.records
    m = guard.metrics()
    assert m["alarm"] == 0.0 and m["alarm_signs"] == 0.0 and m["lr_scale"] == 1.0
    assert m["penalty_step"] >= -1


def test_metrics_reach_the_integrations_prefixed():
    from spectral_guard.integrations import guard_metrics

    model = _model()
    guard = spectral_guard.instrument(model)
    _train(model, 2)
    m = guard_metrics(guard)
    for key in ("alarm", "alarm_signs", "lr_scale", "lr_backoffs", "penalty", "penalty_step"):
        assert isinstance(m[f"spectral_guard/{key}"], float)


# -- instrumentation and state -------------------------------------------------------------------


def test_a_layer_collapsed_at_instrumentation_is_treated_from_the_first_step():
    model = _model()
    with torch.no_grad():   # rank one: the absolute collapse rule reads it at the baseline
        w = model.blocks[0].fc.weight
        w.copy_(torch.outer(torch.randn(w.shape[0]), torch.randn(w.shape[1])))
    guard = spectral_guard.instrument(model, attention=False, ratio=0.05)
    row = guard.stats()["layers"]["blocks.0.fc"]
    assert row["lambda_collapse"] > 0 and row["interventions"] == 1    # before any step
    assert guard.history[-1]["layer"] == "blocks.0.fc" and guard.history[-1]["step"] == 0
    healthy = guard.stats()["layers"]["blocks.0.q_proj"]
    assert healthy["lambda_collapse"] == 0 and healthy["interventions"] == 0
    x, y = next(iter(byte_batches(synthetic_text(2000, 0), 2, 16, 1, seed=0)))
    plain = _model()
    with torch.no_grad():
        plain.blocks[0].fc.weight.copy_(w)
    assert model(x, y)["loss"] > plain(x, y)["loss"]           # the first step's loss has it


def test_history_is_part_of_the_guard_state_and_old_states_load():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0)
    _train(model, 3)
    state = guard.state_dict()
    assert len(state["history"]) == len(guard.history) > 0
    assert state["signs"]["alarm_signs"] == 0 and state["lr_backoff"]["scale"] == 1.0
    guard.remove()
    fresh = spectral_guard.instrument(model, ratio=1.0)
    fresh.load_state_dict(state)
    assert list(fresh.history) == list(guard.history)
    old = {k: v for k, v in state.items() if k not in ("history", "signs")}
    old["lr_backoff"] = {"scale": 0.5, "backoffs": 1}               # before the graded policy
    old["config"] = {k: v for k, v in state["config"].items()
                     if k not in ("lr_policy", "lr_recovery", "lr_grace")}
    with pytest.warns(UserWarning, match="lr_policy 'alarm' -> 'graded'"):
        fresh.load_state_dict(old)
    assert fresh.metrics()["lr_scale"] == 0.5 and list(fresh.history) == list(guard.history)


# -- the config's validation ---------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"gain": -1.0}, "gain must be >= 0"), ({"lambda_floor": 1.0}, "lambda_floor"),
    ({"lambda_base": -1.0}, "lambda_base"), ({"fiedler_rows": 1}, "fiedler_rows"),
    ({"seed": 0.5}, "seed must be an int"), ({"every": 1.5}, "every must be an int"),
    ({"include": ["("]}, "include holds"), ({"exclude": [3]}, "exclude holds"),
    ({"auto_loss": 1}, "auto_loss must be True or False"),
    ({"lr_policy": "never"}, "lr_policy"), ({"lr_recovery": -1}, "lr_recovery"),
    ({"lr_grace": -1}, "lr_grace"), ({"lr_count": "all"}, "lr_count")])
def test_every_field_is_validated_with_a_one_line_error(kw, match):
    from spectral_guard.guard.config import GuardConfig

    with pytest.raises(ValueError, match=match) as err:
        GuardConfig(**kw)
    assert "\n" not in str(err.value)


def test_the_alarms_first_sign_is_a_warning_also_after_a_back_off(caplog):
    guard = _quiet_guard()
    signs = guard.signs
    with caplog.at_level(logging.INFO, logger="spectral_guard"):
        guard.backoff.scale = 0.5
        signs.announce(5, [], [], 6)                          # the back-off first: WARNING
        signs.reason = "collapse quorum: ..."
        signs.announce(9, ["blocks.0.fc"], [], 6)             # the alarm's first sign: WARNING
        signs.announce(19, ["blocks.0.fc", "blocks.0.proj"], [], 6)   # a new set: INFO
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2 + [logging.INFO]
    assert "alarm (collapse quorum" in caplog.records[1].getMessage()
