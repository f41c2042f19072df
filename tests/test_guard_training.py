"""Defaults on real (small) training: a healthy run is left alone, a stressed one is treated.

A byte-level 2-layer GPT on generated text, 60 AdamW steps from one seed and one batch stream.
``stressed`` multiplies the learning rate by 30 from step 20 (the shock of
``bench/thermostat_probe.py``, smaller). The full-size measurement is in docs/guard.md.
"""

from __future__ import annotations

import pytest
import torch
from guard_models import byte_batches, seeded_model, synthetic_text

import spectral_guard

STEPS, SHOCK_AT, LR = 60, 20, 1e-3


def _run(shock: float, **overrides) -> dict:
    model = seeded_model(0, n_layers=2, d=32, seq=32)
    guard = spectral_guard.instrument(model, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    data = synthetic_text(50_000, seed=0)
    for step, (x, y) in enumerate(byte_batches(data, 8, 32, STEPS, seed=0)):
        if step == SHOCK_AT:
            for group in opt.param_groups:
                group["lr"] = LR * shock
        loss = model(x, y)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert guard.global_step == STEPS
    return guard.stats()


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    # "stressed" without the periodic matrix sign: what the sensors and the thermostat see;
    # without the block-update guard, whose hinge holds this shock's blocks (fewer layers then
    # collapse: tests/test_guard_blocks.py)
    return {"healthy": _run(1.0), "stressed": _run(30.0, msign_every=0, block_guard=False),
            "stressed_signed": _run(30.0, alarm_attention_factor=1.0, block_guard=False)}


def test_healthy_training_triggers_no_interventions(runs):
    t = runs["healthy"]["totals"]
    assert t["checks"] == STEPS  # ratio 0.05 of 12 layers: 1 layer per step
    assert t["interventions"] <= 1
    assert t["treated_layers"] == 0
    assert "lm_head" in runs["healthy"]["skipped"]  # the output head is never pressured
    assert t["msigns"] == 0   # no alarm, no matrix sign: the run is the plain run


def test_stressed_training_with_the_alarm_raised_gets_the_matrix_sign_and_keeps_its_rank(runs):
    # this small run's attention scale passes its target but not twice it (the default
    # alarm): alarm_attention_factor=1 raises the alarm at the target
    signed, unsigned = runs["stressed_signed"], runs["stressed"]
    assert signed["totals"]["msigns"] > 0

    def mean_retention(stats: dict) -> float:
        rows = [r["sensors"]["effective_rank_retention"] for r in stats["layers"].values()
                if r["sensors"]["effective_rank_retention"] == r["sensors"][
                    "effective_rank_retention"]]
        return sum(rows) / len(rows)

    assert mean_retention(signed) > mean_retention(unsigned) + 0.1


def test_stressed_training_triggers_interventions(runs):
    healthy, stressed = runs["healthy"], runs["stressed"]
    assert stressed["totals"]["interventions"] >= 5
    assert stressed["totals"]["treated_layers"] >= 3
    for row in stressed["layers"].values():
        if row["interventions"]:
            assert row["lambda_collapse"] > 0 or row["checks"] > row["interventions"]
    ret_h = [r["sensors"]["effective_rank_retention"] for r in healthy["layers"].values()]
    ret_s = [r["sensors"]["effective_rank_retention"] for r in stressed["layers"].values()]
    assert sum(ret_s) / len(ret_s) < sum(ret_h) / len(ret_h) - 0.15
