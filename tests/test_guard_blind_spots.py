"""Cases users hit: collapsed or zero layers at instrumentation, weights loaded afterwards,
frozen weights, copies, pickling, dtype casts and failures part-way through instrument()."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from guard_models import byte_batches, seeded_model, synthetic_text
from torch.nn.utils import parametrize
from torch.optim import optimizer as optim_module

import spectral_guard


def _batches(n: int, seed: int = 0):
    return list(byte_batches(synthetic_text(4000, seed), 4, 16, n, seed=seed))


def _model(seed: int = 0):
    return seeded_model(seed, n_layers=1, d=32, seq=16)


def _rank1_(W: torch.Tensor) -> None:
    with torch.no_grad():
        W.copy_(torch.outer(W[:, 0], W[0]))


def test_a_layer_collapsed_before_instrument_is_flagged():
    model = _model()
    _rank1_(model.blocks[0].fc.weight)
    guard = spectral_guard.instrument(model, ratio=1.0)
    guard.step()
    rows = guard.stats()["layers"]
    assert rows["blocks.0.fc"]["sensors"]["effective_rank_retention"] == pytest.approx(1.0,
                                                                                      abs=1e-3)
    assert rows["blocks.0.fc"]["lambda"] > 0  # by the absolute rule: retention cannot see it
    assert {n for n, r in rows.items() if r["lambda"] > 0} == {"blocks.0.fc"}
    relative_only = _model()
    _rank1_(relative_only.blocks[0].fc.weight)
    g2 = spectral_guard.instrument(relative_only, ratio=1.0, collapse_rule=False)
    g2.step()
    assert g2.stats()["layers"]["blocks.0.fc"]["lambda"] == 0  # the old blind spot


def test_zero_initialized_layer_gets_its_baseline_once_it_is_non_zero():
    model = _model()
    nn.init.zeros_(model.blocks[0].proj.weight)  # zero-init output projection
    guard = spectral_guard.instrument(model, ratio=1.0)
    assert guard.stats()["layers"]["blocks.0.proj"]["baseline"] is None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in _batches(4):
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
    row = guard.stats()["layers"]["blocks.0.proj"]
    assert row["baseline"] is not None and row["baseline"]["effective_rank"] > 0
    assert 0 < row["sensors"]["effective_rank_retention"] < 10


def test_loading_weights_after_instrument_takes_the_baselines_again():
    model = _model(0)
    guard = spectral_guard.instrument(model, ratio=1.0, step_on="manual")
    before = guard.stats()["layers"]["blocks.0.fc"]["baseline"]["effective_rank"]
    pretrained = _model(1)
    _rank1_(pretrained.blocks[0].fc.weight)
    model.load_state_dict(pretrained.state_dict())
    after = guard.stats()["layers"]["blocks.0.fc"]["baseline"]["effective_rank"]
    assert after < 0.2 * before  # the baseline is the loaded (collapsed) weight's
    guard.step()  # the check launched before the load is dropped, not applied
    assert guard.stats()["layers"]["blocks.0.fc"]["checks"] == 0
    guard.step()
    row = guard.stats()["layers"]["blocks.0.fc"]
    assert row["checks"] == 1
    assert row["sensors"]["effective_rank_retention"] == pytest.approx(1.0, abs=1e-3)


def test_frozen_weights_are_watched_not_penalized():
    model = _model()
    _rank1_(model.blocks[0].fc.weight)
    _rank1_(model.blocks[0].q_proj.weight)
    model.blocks[0].fc.weight.requires_grad_(False)
    guard = spectral_guard.instrument(model, ratio=1.0, auto_loss=False)
    guard.step()
    rows = guard.stats()["layers"]
    assert rows["blocks.0.fc"]["frozen"] and rows["blocks.0.fc"]["checks"] == 1
    assert rows["blocks.0.fc"]["lambda"] == 0 and rows["blocks.0.q_proj"]["lambda"] > 0
    x, _ = _batches(1)[0]
    model(x)
    pen = guard.penalty()
    W = model.blocks[0].fc.parametrizations.weight.original
    assert not W.requires_grad and pen.requires_grad
    assert any(h["layer"] == "blocks.0.fc" and h["triggered"] for h in guard.history)


def test_deepcopy_gives_a_copy_guarded_on_its_own():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, auto_loss=False)
    twin = copy.deepcopy(model)
    twin_guard = twin._spectral_guard
    assert twin_guard is not guard and twin_guard.model is twin
    _rank1_(twin.blocks[0].fc.weight)
    opt = torch.optim.SGD(twin.parameters(), lr=0.0)
    for _ in range(2):
        opt.step()  # only the twin's optimizer steps
    assert twin_guard.global_step == 2 and guard.global_step == 0
    assert twin_guard.stats()["layers"]["blocks.0.fc"]["lambda"] > 0
    x, _ = _batches(1)[0]
    twin(x)
    pen = twin_guard.penalty()
    Wt = twin.blocks[0].fc.parametrizations.weight.original
    Wm = model.blocks[0].fc.parametrizations.weight.original
    assert torch.autograd.grad(pen, Wt)[0].abs().sum() > 0
    assert torch.autograd.grad(pen, Wm, allow_unused=True)[0] is None
    model(x)
    assert float(guard.penalty()) == 0.0  # the original saw nothing of the twin's step
    spectral_guard.remove(twin)
    assert parametrize.is_parametrized(model.blocks[0].fc, "weight")
    assert not parametrize.is_parametrized(twin.blocks[0].fc, "weight")


def test_averaged_model_of_an_instrumented_model():
    model = _model()
    spectral_guard.instrument(model)
    ema = torch.optim.swa_utils.AveragedModel(model)
    ema.update_parameters(model)
    x, y = _batches(1)[0]
    torch.testing.assert_close(ema(x, y)["logits"], model(x, y)["logits"])


def test_torch_save_of_the_model_names_state_dict():
    model = _model()
    spectral_guard.instrument(model)
    with pytest.raises(Exception) as info:
        torch.save(model, io.BytesIO())
    message = str(info.value)
    assert "state_dict()" in message and "\n" not in message.strip()
    torch.save(model.state_dict(), io.BytesIO())  # the supported way


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_half_and_bf16_casts_keep_guard_state(cast):
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, step_on="manual")
    guard.step()
    probe = model.blocks[0].fc.parametrizations.weight[0]
    u = probe.u.clone()
    before = guard.stats()["layers"]
    model.half() if cast == "half" else model.to(torch.bfloat16)
    assert model.blocks[0].fc.weight.dtype in (torch.float16, torch.bfloat16)
    assert probe.u.dtype == torch.float32 and torch.equal(probe.u, u)
    assert guard.stats()["layers"] == before
    guard.step()
    after = guard.stats()["layers"]["blocks.0.fc"]["sensors"]["effective_rank_retention"]
    assert after == pytest.approx(1.0, abs=0.02)  # rounding to 16 bits moves little


class _Fragile(nn.Linear):
    """A Linear whose hook registration fails, as a third-party subclass might."""

    def register_load_state_dict_post_hook(self, hook):  # noqa: D102
        raise RuntimeError("cannot register hooks on this layer")


def test_failure_part_way_leaves_the_model_as_it_was():
    model = _model()
    model.blocks[0].proj = _Fragile(128, 32)  # after q, k, v, o and fc in module order
    keys = list(model.state_dict())
    hooks_before = len(optim_module._global_optimizer_post_hooks)
    with pytest.raises(RuntimeError, match="cannot register"):
        spectral_guard.instrument(model)
    assert list(model.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not hasattr(model, "_spectral_guard")
    assert not model._forward_hooks
    assert len(optim_module._global_optimizer_post_hooks) == hooks_before
