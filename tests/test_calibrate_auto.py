"""``spectral_guard.auto_calibrate(model)``: tier settings by parameter count (models built on
the meta device), thresholds from a file or from the model's own weights, the random-weights
warning, and the GuardConfig going straight to ``instrument``."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from audit_fixtures import tiny_models
from calibrate_family import family  # noqa: F401  (session fixture)
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

import spectral_guard
from spectral_guard.calibration import CalibrationWarning, RandomWeightsWarning, calibrate
from spectral_guard.guard.auto import TIERS, count_parameters, tier_for
from spectral_guard.guard.config import GuardConfig, render_config
from spectral_guard.thresholds import default_thresholds

# (width, layers) of a stack of square nn.Linear layers: ~50M, ~201M, ~1.07B, ~3.2B parameters
TIER_MODELS = {"< 100M": (4096, 3), "100M-500M": (8192, 3), "500M-2B": (16384, 4),
               "> 2B": (32768, 3)}
EXPECTED = {  # (ratio, every, biopsy_limit, lambda_base spectral, lambda_base l2)
    "< 100M": (0.05, 1, 192, 0.05, 1e-4),
    "100M-500M": (0.05, 2, 256, 0.025, 5e-5),
    "500M-2B": (0.02, 5, 256, 0.01, 2e-5),
    "> 2B": (0.01, 10, 256, 0.005, 1e-5),
}


def meta_model(width: int, layers: int) -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def test_tier_boundaries():
    assert tier_for(0).name == "< 100M"
    assert tier_for(99_999_999).name == "< 100M"
    assert tier_for(100_000_000).name == "100M-500M"
    assert tier_for(499_999_999).name == "100M-500M"
    assert tier_for(2_000_000_000).name == "> 2B"
    assert [t.paper_biopsy_limit for t in TIERS] == [1024, 768, 512, 384]
    assert all(t.biopsy_limit <= 256 for t in TIERS)  # measured departure, docs/calibration.md
    # the guard's defaults are the smallest tier's sampling (where every efficacy run measured)
    small, default = TIERS[0], GuardConfig()
    assert (small.ratio, small.every, small.biopsy_limit) == (
        default.ratio, default.every, default.biopsy_limit)
    # each tier checks a layer no more often than the one below (larger models, rarer checks)
    periods = [replace(default, ratio=t.ratio, every=t.every).check_period for t in TIERS]
    assert periods == sorted(periods) and periods[0] == 20


@pytest.mark.parametrize("tier", list(TIER_MODELS))
def test_each_tier_on_the_meta_device(tier, tmp_path):
    model = meta_model(*TIER_MODELS[tier])
    n = count_parameters(model)
    assert tier_for(n).name == tier
    ratio, every, limit, lam_spectral, lam_l2 = EXPECTED[tier]
    with pytest.warns(CalibrationWarning, match="meta tensors"):
        cfg = spectral_guard.auto_calibrate(model)
    assert isinstance(cfg, GuardConfig)
    assert (cfg.ratio, cfg.every, cfg.biopsy_limit) == (ratio, every, limit)
    assert cfg.actuator == "spectral" and cfg.lambda_base == pytest.approx(lam_spectral)
    assert cfg.thresholds.default == default_thresholds().default  # not measured: defaults
    assert cfg.thresholds.provenance["auto_calibrate"]["parameters"] == n
    # with a thresholds file: read, no measurement, no warning; L2 actuator: the paper's lambda
    path = tmp_path / "t.json"
    default_thresholds().save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg2 = spectral_guard.auto_calibrate(model, str(path), actuator="l2")
    assert cfg2.lambda_base == pytest.approx(lam_l2) and cfg2.actuator == "l2"
    assert cfg2.thresholds.groups == default_thresholds().groups
    assert next(p for p in model.parameters()).is_meta  # nothing was materialized


def test_overrides_and_bad_arguments(tmp_path):
    model = meta_model(64, 2)
    path = tmp_path / "t.json"
    default_thresholds().save(path)
    cfg = spectral_guard.auto_calibrate(model, path, ratio=0.5, every=3)
    assert (cfg.ratio, cfg.every) == (0.5, 3)
    with pytest.raises(TypeError, match="unknown GuardConfig"):
        spectral_guard.auto_calibrate(model, path, ratios=0.5)
    with pytest.raises(ValueError, match="actuator"):
        spectral_guard.auto_calibrate(model, path, actuator="l1")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    from spectral_guard.thresholds import ThresholdsError

    with pytest.raises(ThresholdsError, match="not valid JSON"):
        spectral_guard.auto_calibrate(model, bad)


def _member_model(path) -> nn.Module:
    state = load_file(str(path))
    vocab, d = state["model.embed_tokens.weight"].shape
    ffn = state["model.layers.0.mlp.up_proj.weight"].shape[0]
    model = tiny_models.CharLM(vocab, d, 4, ffn, 2, 32)
    model.load_state_dict(state)
    return model


def test_trained_model_learns_its_own_thresholds(family):  # noqa: F811
    model = _member_model(family.references[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        cfg = spectral_guard.auto_calibrate(model)
    th = cfg.thresholds
    assert "learned from the model's 15 matrices" in th.provenance["auto_calibrate"]["thresholds"]
    assert th.default.stable_rank_min != default_thresholds().default.stable_rank_min
    # the law: every matrix of the model passes the thresholds learned from it
    own = spectral_guard.audit(model, thresholds=th)
    assert len(own.matrices) == 15
    assert [m.name for m in own.matrices if m.status != "ok"] == []
    guard = spectral_guard.instrument(model, cfg)
    try:
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == model.lm_head.out_features
    finally:
        spectral_guard.remove(model)
    assert guard is not None


def test_a_live_model_is_measured_as_its_saved_weights(family):  # noqa: F811
    # auto_calibrate measures through the audit's own reader: the thresholds it learns from the
    # live model are those calibrate learns from the saved file
    model = _member_model(family.references[0])
    live = spectral_guard.auto_calibrate(model).thresholds
    saved = calibrate(family.references[0]).thresholds
    assert live.default == saved.default
    assert live.groups == saved.groups
    assert live.provenance["source"] == "spectral_guard.auto_calibrate"
    assert live.provenance["groups"] == saved.provenance["groups"]


def test_random_model_warns_and_keeps_the_defaults():
    torch.manual_seed(0)
    model = tiny_models.CharLM(30, 96, 4, 384, 2, 32)
    with pytest.warns(RandomWeightsWarning, match="randomly initialized"):
        cfg = spectral_guard.auto_calibrate(model)
    assert cfg.thresholds.default == default_thresholds().default
    assert cfg.thresholds.provenance["auto_calibrate"]["random_weights"]["looks_random"]
    with pytest.warns(RandomWeightsWarning, match="anyway"):
        forced = spectral_guard.auto_calibrate(model, allow_random=True)
    assert forced.thresholds.default != default_thresholds().default


def test_render_config_is_a_rich_table(tmp_path):
    model = meta_model(4096, 3)
    path = tmp_path / "t.json"
    default_thresholds().save(path)
    cfg = spectral_guard.auto_calibrate(model, path)
    console = Console(record=True, width=120)
    console.print(render_config(cfg))
    text = console.export_text()
    for expected in ("GuardConfig", "ratio", "0.05", "biopsy_limit", "192", "lambda_base",
                     "tier < 100M", "50,343,936 parameters", f"given ({path})"):
        assert expected in text, expected
    console = Console(record=True, width=120)
    console.print(render_config(GuardConfig()))
    assert "shipped defaults" in console.export_text()
