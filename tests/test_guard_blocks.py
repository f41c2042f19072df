"""The block-update guard (spectral_guard/guard/blocks.py): which modules are blocks, the update
scale against numpy, the hinge and its gradient against an independent forward, untreated runs
bit-identical to unguarded ones, the one-step lag, state round trip, removal, validation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from guard_models import byte_batches, seeded_model, synthetic_text

import spectral_guard
from spectral_guard.guard.blocks import BLOCK_MARGIN, find_blocks, update_hinge, update_scale
from spectral_guard.guard.config import GuardConfig


def train(model: nn.Module, guard: object | None, steps: int, lr: float = 3e-3,
          seed: int = 0) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in byte_batches(synthetic_text(20_000, seed), 4, 32, steps, seed):
        loss = model(x, y)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def block_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input, output)`` of every block of a TinyGPT, by running its forward by hand."""
    h = model.wte(x) + model.wpe(torch.arange(x.shape[1]))
    pairs = []
    for block in model.blocks:
        out = block(h)
        pairs.append((h, out))
        h = out
    return pairs


def test_update_scale_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen)
    y = x + 2.5 * torch.randn(3, 5, 7, generator=gen)
    ref = np.sqrt(np.mean((y.numpy().astype(np.float64) - x.numpy()) ** 2))
    assert float(update_scale(x, y)) == pytest.approx(ref, rel=1e-6)
    assert update_scale(x.bfloat16(), y.bfloat16()).dtype == torch.float32


def test_update_hinge_values() -> None:
    u = torch.tensor([0.5, 1.0, 3.0, float("inf"), float("nan")])
    got = update_hinge(u, 2.0)
    assert got.tolist()[:3] == [0.0, 0.0, pytest.approx(0.25)]
    assert got[3] == 0 and got[4] == 0   # non-finite readings add nothing


def test_find_blocks_in_model_order() -> None:
    model = seeded_model(0, n_layers=3)
    pairs, _ = spectral_guard.attention_pairs.find_pairs(model)
    assert [n for n, _ in find_blocks(model, pairs)] == ["blocks.0", "blocks.1", "blocks.2"]
    mha = seeded_model(0, n_layers=2, use_mha=True)   # pair named by its attention module
    pairs, _ = spectral_guard.attention_pairs.find_pairs(mha)
    assert [n for n, _ in find_blocks(mha, pairs)] == ["blocks.0", "blocks.1"]
    assert find_blocks(nn.Sequential(nn.Linear(4, 4)), []) == []
    stack = nn.Sequential(*seeded_model(0, n_layers=2).blocks)   # the model is the list
    pairs, _ = spectral_guard.attention_pairs.find_pairs(stack)
    assert [n for n, _ in find_blocks(stack, pairs)] == ["0", "1"]


def test_readings_match_an_independent_forward() -> None:
    model = seeded_model(0, n_layers=2)
    guard = spectral_guard.instrument(model, every=1)
    x, y = next(byte_batches(synthetic_text(5_000), 4, 32, 1))
    model(x, y)["loss"].backward()
    got = [float(u) for u in guard.blocks._latest]
    with torch.no_grad():
        ref = [math.sqrt(((o.double() - i.double()) ** 2).mean().item())
               for i, o in block_inputs(model, x)]
    assert got == pytest.approx(ref, rel=1e-5)
    # eval and no_grad forwards are not read
    guard.blocks._latest = [None, None]
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert guard.blocks._latest == [None, None]
    guard.remove()


def test_untreated_run_is_bit_identical() -> None:
    plain = seeded_model(1, n_layers=2)
    guarded = copy.deepcopy(plain)
    guard = spectral_guard.instrument(guarded, attention=False, msign_every=0,
                                      block_max_update=1e6)
    a = train(plain, None, 6)
    b = train(guarded, guard, 6)
    assert a == b
    assert guard.metrics()["block_treated"] == 0
    guard.remove()
    for p, q in zip(plain.parameters(), guarded.parameters(), strict=True):
        assert torch.equal(p, q)


def test_treated_block_gets_the_hinge_and_its_gradient() -> None:
    model = seeded_model(2, n_layers=2)
    guard = spectral_guard.instrument(model, every=1, attention=False, msign_every=0,
                                      block_max_update=1e-3, block_lambda=0.2)
    train(model, guard, 2)          # readings of step 1 applied at step 2: treated
    st = guard.blocks.states[0]
    assert st.lam > 0 and st.interventions >= 1
    # lambda follows the thermostat: lambda_base (1 + gain * severity)
    sev = 1 - st.target / st.scale
    assert st.lam == pytest.approx(0.2 * (1 + guard.config.gain * min(1.0, sev)))
    x, y = next(byte_batches(synthetic_text(5_000, 3), 4, 32, 1))
    model.zero_grad()
    out = model(x, y)    # auto_loss: the block terms are in out["loss"]
    with torch.no_grad():
        pairs = block_inputs(model, x)
    expected = sum(s.lam * max(math.sqrt(((o - i) ** 2).mean().item()) / s.target - 1, 0) ** 2
                   for s, (i, o) in zip(guard.blocks.states, pairs, strict=True))
    ce = torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), y.flatten())
    term = out["loss"] - ce
    assert float(term.detach()) == pytest.approx(expected, rel=1e-4)
    term.backward()
    # the term's gradient reaches the weights that wrote the update, not those after them
    assert model.blocks[0].proj.parametrizations.weight.original.grad.abs().sum() > 0
    assert not model.lm_head.weight.grad.any()   # the cross-entropy cancels exactly
    assert guard.blocks.penalty() is None      # each forward's terms are taken once
    guard.remove()


def test_target_from_the_first_reading_and_one_step_lag() -> None:
    model = seeded_model(3, n_layers=2)
    guard = spectral_guard.instrument(model, every=1, attention=False, msign_every=0)
    assert all(math.isnan(st.target) for st in guard.blocks.states)
    train(model, guard, 1)   # the first reading is in flight
    assert all(math.isnan(st.target) for st in guard.blocks.states)
    train(model, guard, 1)
    for st in guard.blocks.states:
        assert st.target == max(1.0, BLOCK_MARGIN * st.baseline)
        assert st.checks == 1
    guard.remove()


def test_state_round_trip_with_readings_in_flight() -> None:
    model = seeded_model(4, n_layers=2)
    guard = spectral_guard.instrument(model, every=1, attention=False, msign_every=0,
                                      block_max_update=1e-3)
    train(model, guard, 3)
    state = guard.state_dict()
    assert state["blocks"]["pending"] is not None
    twin = seeded_model(4, n_layers=2)
    twin.load_state_dict(model.state_dict())
    guard2 = spectral_guard.instrument(twin, every=1, attention=False, msign_every=0,
                                       block_max_update=1e-3)
    guard2.load_state_dict(state)
    train(model, guard, 1, seed=5)
    train(twin, guard2, 1, seed=5)
    for a, b in zip(guard.blocks.states, guard2.blocks.states, strict=True):
        assert vars(a) == vars(b)
    with pytest.raises(ValueError, match="other blocks"):
        bad = dict(state["blocks"], blocks={"x": {}})
        guard2.blocks.load_state_dict(bad)
    guard.remove()
    guard2.remove()


def test_remove_takes_the_hooks_off() -> None:
    model = seeded_model(5, n_layers=2)
    hooks = [len(b._forward_hooks) for b in model.blocks]
    guard = spectral_guard.instrument(model)
    assert [len(b._forward_hooks) for b in model.blocks] == [h + 1 for h in hooks]
    assert len(model._forward_pre_hooks) == 1   # the block guard's "a forward starts"
    guard.remove()
    assert [len(b._forward_hooks) for b in model.blocks] == hooks
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_off_and_validation() -> None:
    model = seeded_model(6, n_layers=2)
    guard = spectral_guard.instrument(model, block_guard=False)
    assert guard.blocks is None and "block_update_ratio" not in guard.metrics()
    guard.remove()
    with pytest.raises(ValueError, match="block_max_update"):
        GuardConfig(block_max_update=0.0)
    with pytest.raises(ValueError, match="block_lambda"):
        GuardConfig(block_lambda=-1.0)


@pytest.mark.parametrize("mode", [True, "reentrant"])
def test_activation_checkpointing_with_treated_blocks(mode) -> None:
    """Non-reentrant checkpointing: the blocks are read (as without checkpointing) and their
    terms train, the recomputation in backward saving what the forward saved; reentrant
    checkpointing runs the blocks' forward without grad: they are not read, and nothing
    fails."""
    plain = seeded_model(7, n_layers=2)
    model = seeded_model(7, n_layers=2, checkpoint=mode)
    guards = [spectral_guard.instrument(m, block_max_update=0.01, attention=False,
                                        msign_every=0) for m in (plain, model)]
    losses = [train(m, g, 4) for m, g in zip((plain, model), guards, strict=True)]
    ref, got = guards
    if mode is True:
        assert got.metrics()["block_treated"] == 2
        assert [st.scale for st in got.blocks.states] == pytest.approx(
            [st.scale for st in ref.blocks.states], rel=1e-5)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    else:
        assert [st.checks for st in got.blocks.states] == [0, 0]
    for g in guards:
        g.remove()
