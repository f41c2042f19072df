"""Faults mid-training, resume in a fresh process, and gradient accumulation."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from guard_models import byte_batches, seeded_model, synthetic_text, thresholds

import spectral_guard

ALWAYS = thresholds(effective_rank_retention_min=2.0)


def _batches(n: int, batch: int = 4, seed: int = 0):
    return list(byte_batches(synthetic_text(6000, seed), batch, 16, n, seed=seed))


def _model(seed: int = 0):
    return seeded_model(seed, n_layers=1, d=32, seq=16)


def test_nan_injected_mid_training_is_reported_and_never_reaches_the_loss():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=ALWAYS, auto_loss=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    W = model.blocks[0].fc.parametrizations.weight.original
    penalties, flagged = [], []
    for step, (x, _) in enumerate(_batches(6)):
        if step == 2:
            with torch.no_grad():
                W[1, 2] = float("nan")
                W[4, 4] = float("inf")
        model(x)
        pen = guard.penalty()
        penalties.append(pen.detach())
        if pen.requires_grad:  # from step 1 on (check 0 is applied at the first step)
            pen.backward()  # only the penalty: the NaN layer's own output is not in this loss
        with torch.no_grad():
            W.grad = torch.nan_to_num(W.grad) if W.grad is not None else None
        opt.step()
        opt.zero_grad()
        flagged.append(guard.stats()["layers"]["blocks.0.fc"]["nonfinite"])
    assert all(bool(torch.isfinite(p)) for p in penalties)
    assert all(float(p) > 0 for p in penalties[1:])
    # injected during step 2: seen by the check launched as step 2 ends, applied at step 3's end
    assert flagged == [False, False, False, True, True, True]
    rows = guard.stats()["layers"]
    assert rows["blocks.0.fc"]["nonfinite_entries"] == 2
    others = [r for n, r in rows.items() if n != "blocks.0.fc"]
    assert all(r["lambda"] > 0 and r["checks"] == 6 for r in others)  # still guarded


def test_nonfinite_loss_leaves_guard_state_unchanged():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=ALWAYS)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    (x, y), = _batches(1)
    loss = model(x, y)["loss"]
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = repr(guard.state_dict())
    with torch.no_grad():
        emb = model.wte.weight.clone()
        model.wte.weight[x[0, 0]] = float("nan")  # the loss becomes NaN, the Linears do not
    loss = model(x, y)["loss"]
    assert not bool(torch.isfinite(loss))
    scaler.scale(loss).backward()
    scaler.step(opt)  # inf/NaN gradients: the step is skipped, so is the guard's clock
    scaler.update()
    opt.zero_grad()
    assert repr(guard.state_dict()) == before
    with torch.no_grad():
        model.wte.weight.copy_(emb)


class _Huge(nn.Module):
    """One float64 layer whose biopsy's Gram matrix overflows: LAPACK fails on it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.bad = nn.Linear(16, 16, bias=False).double()
        self.good = nn.Linear(16, 16, bias=False).double()
        with torch.no_grad():
            self.bad.weight.copy_(torch.randn(16, 16, generator=g, dtype=torch.float64) * 1e200)
            self.good.weight.copy_(torch.randn(16, 16, generator=g, dtype=torch.float64))

    def forward(self, x):
        return {"loss": self.good(x).square().mean()}


def test_an_exception_inside_a_check_is_caught_and_training_goes_on():
    model = _Huge()
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=ALWAYS)
    opt = torch.optim.SGD(model.good.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(4, 16, dtype=torch.float64))["loss"].backward()
        opt.step()
        opt.zero_grad()
    rows = guard.stats()["layers"]
    assert rows["bad"]["failed_checks"] == 3 and math.isnan(rows["bad"]["sensors"]["stable_rank"])
    assert rows["good"]["failed_checks"] == 0 and rows["good"]["lambda"] > 0
    assert guard.stats()["totals"]["failed_checks"] == 3


def test_accumulation_k4_matches_k1_in_guard_state_and_penalty_gradient():
    """k=1 with batch B and k=4 with batch B/4: the penalty joins each micro-batch's loss at
    full weight and the loop divides by k, so the penalty counts once per optimizer step."""
    base = _model()
    data = _batches(3, batch=8, seed=2)
    out = {}
    for k in (1, 4):
        model = copy.deepcopy(base)
        guard = spectral_guard.instrument(model, ratio=0.5,
                                          thresholds=thresholds(effective_rank_retention_min=1.0))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for x, y in data:
            for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
                (model(xs, ys)["loss"] / k).backward()
            opt.step()
            opt.zero_grad()
        assert guard.stats()["totals"]["treated_layers"] > 0
        x, _ = data[0]
        model(x)
        pen = guard.penalty()
        W = [m.parametrizations.weight.original for n, m in model.named_modules()
             if n in guard.layer_names]
        out[k] = (guard.stats()["layers"], torch.autograd.grad(pen, W, allow_unused=True))
    (s1, g1), (s4, g4) = out[1], out[4]
    for name in s1:
        assert s1[name]["checks"] == s4[name]["checks"]
        assert s1[name]["lambda"] == pytest.approx(s4[name]["lambda"], rel=1e-4)
        r1, r4 = s1[name]["sensors"], s4[name]["sensors"]
        assert r1["effective_rank"] == pytest.approx(r4["effective_rank"], rel=1e-4)
    assert sum(a is not None for a in g1) > 0
    for a, b in zip(g1, g4, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Resume in a fresh process

CFG = dict(ratio=0.5, thresholds=thresholds(effective_rank_retention_min=0.995))
STEPS, SPLIT = 8, 4


def _train(model, opt, batches):
    for x, y in batches:
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()


def _resume_in_child(rank: int, ckpt_path: str, out_path: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    model = seeded_model(99, n_layers=1, d=32, seq=16)  # another init: all from the checkpoint
    ckpt = torch.load(ckpt_path, weights_only=False)
    model.load_state_dict(ckpt["model"])
    guard = spectral_guard.instrument(model, **CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    opt.load_state_dict(ckpt["opt"])
    guard.load_state_dict(ckpt["guard"])
    _train(model, opt, _batches(STEPS, seed=3)[SPLIT:])
    torch.save({"model": model.state_dict(), "guard": guard.state_dict()}, out_path)


@pytest.mark.timeout(120)
def test_resume_in_a_fresh_process_is_bit_for_bit(tmp_path):
    batches = _batches(STEPS, seed=3)
    ref = _model()
    g_ref = spectral_guard.instrument(ref, **CFG)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-2)
    _train(ref, opt_ref, batches)
    first = _model()
    g1 = spectral_guard.instrument(first, **CFG)
    opt1 = torch.optim.AdamW(first.parameters(), lr=3e-2)
    _train(first, opt1, batches[:SPLIT])
    state = g1.state_dict()
    assert state["inflight"] is not None  # a check is in flight at the save
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "guard": state},
               tmp_path / "ckpt.pt")
    mp.spawn(_resume_in_child, args=(str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pt")),
             nprocs=1, join=True)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert g_ref.stats()["totals"]["interventions"] > 0
    for k, v in ref.state_dict().items():
        assert torch.equal(v, out["model"][k]), k
    s_ref = g_ref.state_dict()
    assert out["guard"]["step"] == s_ref["step"] == STEPS
    for name, saved in s_ref["layers"].items():
        assert repr(saved["state"]) == repr(out["guard"]["layers"][name]["state"]), name


def test_state_from_other_settings_warns_and_other_layers_refuse():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=0.5)
    state = guard.state_dict()
    other = spectral_guard.instrument(_model(), ratio=0.25, seed=3)
    with pytest.warns(UserWarning, match=r"ratio 0.5 -> 0.25.*seed 0 -> 3|seed 0 -> 3"):
        other.load_state_dict(state)
    fewer = spectral_guard.instrument(_model(), exclude=(r"\.fc$",))
    with pytest.raises(ValueError, match="other layers") as info:
        fewer.load_state_dict(state)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="version"):
        fewer.load_state_dict({"version": 1})
