"""The matrix-sign actuator (guard/msign.py) against numpy's SVD, and its wiring in the Guard:
flagged layers (``actuator="msign"``) and the periodic schedule (``msign_every``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from guard_models import byte_batches, seeded_model, synthetic_text

import spectral_guard
from spectral_guard.guard.msign import (
    looks_random_init,
    msign_,
    polar_exact,
    polar_newton_schulz,
)
from spectral_guard.guard.state import LayerState


def _spread(m: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """An ``m x n`` matrix with singular values log-spaced from 1 down to ``1 / cond``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * torch.logspace(0, -np.log10(cond), k, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (9, 9)])
def test_msign_is_the_frobenius_scaled_polar_factor_of_numpy_svd(shape):
    W = _spread(*shape, cond=1e4, seed=1).float()
    U, s, Vt = np.linalg.svd(W.double().numpy(), full_matrices=False)
    frob = float(np.linalg.norm(W.double().numpy()))
    expected = U @ Vt * frob / np.sqrt(len(s))
    out = msign_(W.clone())
    assert np.allclose(out.double().numpy(), expected, atol=1e-5)
    assert float(out.double().norm()) == pytest.approx(frob, rel=1e-6)
    sv = torch.linalg.svdvals(out.double())
    assert float(sv.max() / sv.min()) == pytest.approx(1.0, abs=1e-5)


def test_msign_keeps_the_rank_of_a_rank_deficient_matrix():
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(10, 3, generator=g) @ torch.randn(3, 8, generator=g)).double()
    P = polar_exact(W)
    sv = torch.linalg.svdvals(P)
    assert torch.allclose(sv[:3], torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert float(sv[3:].abs().max()) < 1e-9  # null directions are not amplified from noise
    out = msign_(W.clone())
    assert float(out.norm()) == pytest.approx(float(W.norm()), rel=1e-9)
    assert int(torch.linalg.matrix_rank(out)) == 3


MUON = (3.4445, -4.7750, 2.0315)   # Muon's published quintic: x -> a x + b x^3 + c x^5


@pytest.mark.parametrize("shape", [(64, 200), (200, 64)])
def test_newton_schulz_is_six_quintic_steps_on_each_singular_value(shape):
    """The iteration acts on each singular value of ``W / ||W||_F`` by the scalar quintic and
    keeps the singular vectors: with numpy's SVD ``W = U S V^T`` the result is
    ``U f^6(S / ||W||_F) V^T``. Five or seven steps miss it by 0.42 and 0.36 (relative)."""
    W = _spread(*shape, cond=1e3, seed=2)
    U, s, Vt = np.linalg.svd(W.numpy(), full_matrices=False)
    x = s / np.linalg.norm(W.numpy())
    for _ in range(6):
        x = MUON[0] * x + MUON[1] * x**3 + MUON[2] * x**5
    expected = (U * x) @ Vt
    N = polar_newton_schulz(W).double().numpy()
    assert np.linalg.norm(N - expected) / np.linalg.norm(expected) < 1e-4   # float32: ~7e-6
    # against the exact polar factor U V^T: every direction of W kept, none amplified from
    # noise past 1.21; six steps lift even the 1e-3 singular values to 0.68
    polar = U @ Vt
    assert np.allclose(polar_exact(W).numpy(), polar, atol=1e-9)
    sv = np.linalg.svd(N, compute_uv=False)
    assert 0.68 < sv.min() and sv.max() < 1.21
    assert np.linalg.norm(N - polar) / np.linalg.norm(polar) < 0.25   # 0.196; 5 steps: 0.312


def test_non_finite_or_zero_weights_are_left_alone():
    W = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    W[1, 2] = float("nan")
    before = W.clone()
    msign_(W)
    assert torch.equal(W.isnan(), before.isnan()) and torch.equal(W[~W.isnan()],
                                                                   before[~before.isnan()])
    Z = torch.zeros(5, 5)
    assert torch.equal(msign_(Z), torch.zeros(5, 5))


def _model():
    return seeded_model(0, n_layers=1, d=32, seq=16)


def _train(model, steps: int, lr: float = 1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for x, y in byte_batches(synthetic_text(4000, 0), 4, 16, steps, seed=0):
        out = model(x, y)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    return opt


def _erank(W: torch.Tensor) -> float:
    s = torch.linalg.svdvals(W.detach().double())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


def test_a_layer_flagged_for_collapse_gets_its_matrix_sign():
    model = _model()
    W = model.blocks[0].fc.weight
    noise = 1e-5 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        W.copy_(torch.outer(W[:, 0], W[0]) + noise)
    erank_before = _erank(W)
    guard = spectral_guard.instrument(model, ratio=1.0, actuator="msign", attention=False,
                                      msign_every=0)
    _train(model, 3)
    rows = guard.stats()["layers"]
    assert rows["blocks.0.fc"]["msigns"] >= 1
    assert {n for n, r in rows.items() if r["msigns"]} == {"blocks.0.fc"}  # only the flagged
    weight = guard.by_name["blocks.0.fc"].weight
    assert erank_before < 4 and _erank(weight) > 0.5 * min(weight.shape)  # Adam moved it since
    assert guard.metrics()["msigns"] == rows["blocks.0.fc"]["msigns"]
    # the collapse is answered by the sign, not by a penalty term
    assert float(guard.penalty()) == 0.0
    spectral = _model()
    with torch.no_grad():
        Ws = spectral.blocks[0].fc.weight
        Ws.copy_(torch.outer(Ws[:, 0], Ws[0]) + noise)
    g2 = spectral_guard.instrument(spectral, ratio=1.0, attention=False, msign_every=0)
    _train(spectral, 3)
    assert g2.metrics()["msigns"] == 0  # the default actuator never rewrites weights


def test_msign_every_signs_every_penalized_layer_on_schedule_and_skips_frozen():
    model = _model()
    model.blocks[0].q_proj.weight.requires_grad_(False)
    guard = spectral_guard.instrument(model, msign_every=4, msign_gate="always", attention=False)
    penalized = [n for n, r in guard.stats()["layers"].items()
                 if r["penalized"] and not r["frozen"]]
    assert penalized
    _train(model, 3)
    assert guard.metrics()["msigns"] == 0
    _train(model, 6)   # steps 4 and 8
    rows = guard.stats()["layers"]
    assert all(rows[n]["msigns"] == 2 for n in penalized)
    assert rows["blocks.0.q_proj"]["msigns"] == 0
    # right after a scheduled sign, every penalized weight has a flat spectrum
    _train(model, 3)   # step 12
    for n in penalized:
        sv = torch.linalg.svdvals(guard.by_name[n].weight.detach().double())
        assert float(sv[0] / sv[-1]) == pytest.approx(1.0, abs=1e-4)


def test_msign_runs_are_deterministic_and_state_dict_carries_counts():
    def run():   # no global seed: the guard and the model draw from their own generators
        model = _model()
        guard = spectral_guard.instrument(model, msign_every=3, msign_gate="always",
                                          actuator="msign", attention=False)
        _train(model, 7, lr=1e-2)
        return model, guard

    (m1, g1), (m2, g2) = run(), run()
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    state = g1.state_dict()
    assert state["config"]["msign_every"] == 3
    g2.load_state_dict(state)
    assert g2.metrics()["msigns"] == g1.metrics()["msigns"] > 0
    old = LayerState().to_dict()
    del old["msigns"]
    assert LayerState.from_dict(old).msigns == 0  # states saved before the actuator existed


def test_config_errors_name_the_choices():
    model = _model()
    with pytest.raises(ValueError, match="'msign'"):
        spectral_guard.instrument(model, actuator="sign")
    with pytest.raises(ValueError, match="msign_every"):
        spectral_guard.instrument(model, msign_every=-1)


def _sv(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.detach().double())


def _readings(W: torch.Tensor) -> tuple[float, float, tuple[int, int]]:
    s = _sv(W)
    p = s / s.sum()
    erank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
    return float(s.square().sum() / s[0] ** 2), erank, tuple(W.shape)


def test_looks_random_init_tells_fresh_initializations_from_trained_spectra():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.init.kaiming_uniform_(torch.empty(64, 128), a=5**0.5, generator=g)
    for W in (torch.randn(96, 384, generator=g), linear,   # nn.Linear(128, 64)'s own init
              0.02 * torch.randn(200, 200, generator=g)):
        assert looks_random_init(*_readings(W))
    spread = _spread(96, 384, cond=30.0)                      # a trained-like decaying spectrum
    spiked = torch.randn(96, 384, generator=g)
    spiked += 3 * torch.outer(torch.randn(96, generator=g), torch.randn(384, generator=g)) / 20
    small = torch.randn(8, 300, generator=g)                   # too few singular values to judge
    assert not looks_random_init(*_readings(spread))
    assert not looks_random_init(*_readings(spiked))
    assert not looks_random_init(*_readings(small))


def test_alarm_gate_signs_only_while_treating_and_only_fresh_layers():
    quiet = _model()
    g_quiet = spectral_guard.instrument(quiet, msign_every=2, attention=False)
    _train(quiet, 8)   # a healthy start: nothing is treated, nothing is signed
    assert g_quiet.metrics()["treated_layers"] == 0 and g_quiet.metrics()["msigns"] == 0

    model = _model()
    pretrained = model.blocks[0].fc.weight
    with torch.no_grad():   # a layer that does not look freshly initialized
        pretrained.copy_(_spread(*pretrained.shape, cond=30.0).float())
    # a target no pair can meet: the attention guard is alarmed from its first reading
    guard = spectral_guard.instrument(model, msign_every=2, attention_max_scale=1e-6)
    rows = guard.stats()["layers"]
    fresh = {n for n, layer in guard.by_name.items() if layer.state.random_init}
    assert "blocks.0.fc" not in fresh and len(fresh) >= 3
    _train(model, 4)    # readings land at step 1; steps 2 and 4 are on the schedule
    rows = guard.stats()["layers"]
    assert {n for n, r in rows.items() if r["msigns"] == 2} == fresh
    assert rows["blocks.0.fc"]["msigns"] == 0
    assert guard.state_dict()["config"]["msign_gate"] == "alarm"


def test_the_alarm_needs_the_attention_scale_past_msign_alarm_times_the_target():
    probe_model = _model()
    probe = spectral_guard.instrument(probe_model, msign_every=0)
    probe.step()   # the readings launched at instrumentation land here
    scale = probe.metrics()["attention_logit_scale"]
    probe.remove()
    assert scale > 0
    # over the target (the penalty acts) but not over twice it: no sign
    model = _model()
    guard = spectral_guard.instrument(model, msign_every=2, attention_max_scale=scale / 1.5)
    _train(model, 4)
    assert guard.metrics()["attention_treated_pairs"] > 0
    assert guard.metrics()["msigns"] == 0
    # the same run with a lower alarm factor signs
    model = _model()
    guard = spectral_guard.instrument(model, msign_every=2, attention_max_scale=scale / 1.5,
                                      alarm_attention_factor=1.2)
    _train(model, 4)
    assert guard.metrics()["msigns"] > 0
    with pytest.raises(ValueError, match="alarm_attention_factor"):
        spectral_guard.instrument(_model(), alarm_attention_factor=0.5)


def test_a_quorum_of_collapsing_layers_raises_the_alarm():
    def collapsed_run(n_collapsed: int, quorum: float) -> dict:
        model = _model()
        guard = spectral_guard.instrument(model, ratio=1.0, attention=False, msign_every=2,
                                          alarm_quorum=quorum)
        names = [n for n, r in guard.stats()["layers"].items() if r["penalized"]]
        for name in names[:n_collapsed]:   # collapse after the (fresh) baselines were taken
            W = guard.by_name[name].weight
            with torch.no_grad():
                W.copy_(torch.outer(W[:, 0], W[0]))
        _train(model, 4, lr=1e-6)   # small steps: the collapse stays what it is
        return {"stats": guard.stats(), "names": names}

    one = collapsed_run(1, quorum=0.25)
    total = len(one["names"])
    assert total >= 4
    assert one["stats"]["totals"]["treated_layers"] == 1
    assert one["stats"]["totals"]["msigns"] == 0          # 1 of `total` is under the quorum
    many = collapsed_run(total // 2, quorum=0.25)
    assert many["stats"]["totals"]["treated_layers"] >= total // 2
    rows = many["stats"]["layers"]
    assert all(rows[n]["msigns"] >= 1 for n in many["names"])   # every fresh layer is signed
    with pytest.raises(ValueError, match="alarm_quorum"):
        spectral_guard.instrument(_model(), alarm_quorum=0.0)


def test_resume_carries_the_latched_alarm_bit_for_bit():
    cfg = dict(msign_every=4, attention_max_scale=1e-6)   # alarm raised from the first reading
    batches = list(byte_batches(synthetic_text(4000, 0), 4, 16, 7, seed=0))

    def steps(model, opt, chunk):
        for x, y in chunk:
            model(x, y)["loss"].backward()
            opt.step()
            opt.zero_grad()

    ref = _model()
    g_ref = spectral_guard.instrument(ref, **cfg)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    steps(ref, opt_ref, batches)

    first = _model()
    g1 = spectral_guard.instrument(first, **cfg)
    opt1 = torch.optim.AdamW(first.parameters(), lr=1e-3)
    steps(first, opt1, batches[:3])
    saved = {"model": first.state_dict(), "opt": opt1.state_dict(), "guard": g1.state_dict()}
    assert saved["guard"]["msign_alarm_seen"] is True and g1.metrics()["msigns"] == 0
    second = seeded_model(7, n_layers=1, d=32, seq=16)
    second.load_state_dict(saved["model"])
    g2 = spectral_guard.instrument(second, **cfg)
    opt2 = torch.optim.AdamW(second.parameters(), lr=1e-3)
    opt2.load_state_dict(saved["opt"])
    g2.load_state_dict(saved["guard"])
    assert g2.state_dict()["msign_alarm_seen"] is True   # the latch survives the round trip
    steps(second, opt2, batches[3:])

    assert g_ref.metrics()["msigns"] == g2.metrics()["msigns"] > 0   # the sign at step 4
    for k, v in ref.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k


def test_a_state_saved_before_the_matrix_sign_loads_as_sign_off():
    import warnings

    old = spectral_guard.instrument(_model(), msign_every=0).state_dict()
    for key in [k for k in old["config"] if k.startswith("msign_")]:
        del old["config"][key]          # what a guard of the previous release saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectral_guard.instrument(_model(), msign_every=0).load_state_dict(old)
    assert not any(k.startswith("msign_") for k in old["config"])   # the caller's dict is kept
    with pytest.warns(UserWarning, match=r"msign_every 0 -> 10"):
        spectral_guard.instrument(_model()).load_state_dict(old)
