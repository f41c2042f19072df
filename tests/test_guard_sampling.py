"""Layer schedule: coverage guarantee, determinism, steps follow the optimizer."""

from __future__ import annotations

import math

import torch
from guard_models import byte_batches, seeded_model, synthetic_text, thresholds
from hypothesis import given, settings
from hypothesis import strategies as st

import spectral_guard
from spectral_guard.guard.sampling import LayerSchedule, check_index, chunk_size, cycle_length


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), ratio=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_every_layer_in_every_window_of_ceil_inverse_ratio_checks(n, ratio, seed):
    sched = LayerSchedule(n, ratio, seed)
    window = math.ceil(1 / ratio)
    assert sched.cycle <= window
    seen_at: dict[int, list[int]] = {}
    for c in range(3 * sched.cycle + window):
        chosen = sched.layers_for_check(c)
        assert len(chosen) <= chunk_size(n, ratio)
        assert len(set(chosen)) == len(chosen)
        for i in chosen:
            seen_at.setdefault(i, []).append(c)
    assert set(seen_at) == set(range(n))
    for checks in seen_at.values():
        assert checks[0] < window
        gaps = [b - a for a, b in zip(checks, checks[1:], strict=False)]
        assert all(g <= window for g in gaps)


def test_chunk_and_cycle_sizes():
    assert chunk_size(36, 0.1) == 4 and cycle_length(36, 0.1) == 9
    assert chunk_size(10, 0.1) == 1 and cycle_length(10, 0.1) == 10
    assert chunk_size(5, 1.0) == 5 and cycle_length(5, 1.0) == 1
    assert chunk_size(3, 0.01) == 1


def test_schedule_is_a_function_of_seed_and_check_only():
    a, b = LayerSchedule(50, 0.1, seed=7), LayerSchedule(50, 0.1, seed=7)
    c = LayerSchedule(50, 0.1, seed=8)
    assert [a.layers_for_check(i) for i in range(20)] == [b.layers_for_check(i) for i in
                                                           range(20)]
    assert [a.layers_for_check(i) for i in range(10)] != [c.layers_for_check(i) for i in
                                                          range(10)]
    # query order does not matter (no hidden state): backwards gives the same chunks
    assert [a.layers_for_check(i) for i in reversed(range(20))] == [
        b.layers_for_check(i) for i in reversed(range(20))]


def test_check_index_every():
    assert [check_index(s, 3) for s in range(7)] == [0, None, None, 1, None, None, 2]
    assert [check_index(s, 1) for s in range(3)] == [0, 1, 2]


def _checked_steps(guard) -> dict[str, int]:
    return {n: r["last_checked_step"] for n, r in guard.stats()["layers"].items()}


def test_schedule_follows_optimizer_steps_under_accumulation():
    model = seeded_model(0, n_layers=2, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    batches = list(byte_batches(synthetic_text(5000), 2, 16, 12))
    for step in range(3):
        expected = set(guard.sampled_layers(step))
        assert len(expected) == math.ceil(0.25 * len(guard.layer_names))
        for micro in range(4):
            x, y = batches[step * 4 + micro]
            (model(x, y)["loss"] / 4).backward()
            assert guard.global_step == step  # micro-batches do not move the clock
        opt.step()
        opt.zero_grad()
        # the chunk scheduled for this step was checked once, and applied at the next step
        stats = guard.stats()["layers"]
        assert {n for n, r in stats.items() if r["last_checked_step"] == step} == expected
    assert guard.global_step == 3
    assert sum(r["checks"] for r in guard.stats()["layers"].values()) == 3 * len(expected)


def test_manual_step_and_attach():
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    other = torch.nn.Linear(3, 3)
    guard = spectral_guard.instrument(model)
    foreign = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(3)).sum().backward()
    foreign.step()  # holds no guarded weight: the clock does not move
    assert guard.global_step == 0
    opt_a = torch.optim.SGD(model.parameters(), lr=0.0)
    opt_b = torch.optim.SGD(model.parameters(), lr=0.0)
    guard.attach(opt_a)
    opt_b.step()
    assert guard.global_step == 0
    opt_a.step()
    assert guard.global_step == 1
    manual = spectral_guard.instrument(seeded_model(1, n_layers=1, d=32, seq=16),
                                       step_on="manual")
    opt_m = torch.optim.SGD(manual.model.parameters(), lr=0.0)
    opt_m.step()
    assert manual.global_step == 0
    manual.step()
    assert manual.global_step == 1


def test_no_global_rng_use():
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    model = seeded_model(0, n_layers=1, d=32, seq=16)
    guard = spectral_guard.instrument(
        model, ratio=1.0, thresholds=thresholds(effective_rank_retention_min=2.0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for x, y in byte_batches(synthetic_text(3000), 2, 16, 3):
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert guard.stats()["totals"]["interventions"] > 0
    assert torch.equal(torch.get_rng_state(), before)
