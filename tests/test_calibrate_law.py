"""Calibration passes its own references by construction: the law of
:mod:`spectral_guard.calibration.rule` on constructed values, then on constructed checkpoints
whose groups have 1-3 matrices, a low outlier the seed paper's ``P10 x 0.8`` would flag, conv
kernels and a dead unit; the committed trained fixtures (tests/data/trained/) when present."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from calibrate_family import family  # noqa: F401  (session fixture)
from safetensors.torch import save_file
from spectral_guard.cli.main import app
from typer.testing import CliRunner

import spectral_guard
from spectral_guard.calibration import CalibrationRule, calibrate, learn
from spectral_guard.calibration.rule import round_toward
from spectral_guard.thresholds import default_thresholds, load_thresholds

TRAINED = Path(__file__).parent / "data" / "trained"
runner = CliRunner()

# ----------------------------------------------------------------------------------------------
# The law on values


def test_law_on_random_values_never_excludes_a_reference():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 30)
        values = [math.exp(rng.gauss(0, 2)) for _ in range(n)]
        rule = CalibrationRule(floor_percentile=rng.uniform(0, 100),
                               floor_margin=rng.uniform(0.1, 3),
                               ceiling_percentile=rng.uniform(0, 100),
                               ceiling_margin=rng.uniform(0.1, 3),
                               min_group=rng.randint(1, 12),
                               reference_margin=rng.choice([1.0, 0.9, rng.uniform(0.05, 1)]))
        fallback = rng.choice([None, math.exp(rng.gauss(0, 2))])
        floor = learn("f", values, "floor", rule, fallback, "test")
        ceiling = learn("c", values, "ceiling", rule, fallback, "test")
        assert floor.value is None or floor.value <= rule.reference_margin * min(values)
        assert ceiling.value is None or ceiling.value >= max(values) / rule.reference_margin
        if fallback is None and n < rule.min_group:
            assert floor.value is None and ceiling.value is None  # an off check stays off


def test_law_keeps_the_percentile_when_it_already_passes_and_widens_otherwise():
    rule = CalibrationRule()
    spread = [10.0 + i for i in range(10)]  # P10 = 10.9; 0.8 x 10.9 = 8.72 < 0.9 x 10 = 9
    item = learn("stable_rank_min", spread, "floor", rule, None, "")
    assert item.source == "percentile" and not item.widened
    assert item.value == pytest.approx(np.percentile(spread, 10) * 0.8)
    tight = [13.24] + [18 + 0.1 * i for i in range(9)]  # the encoder's key: P10 x 0.8 > min
    item = learn("stable_rank_min", tight, "floor", rule, None, "")
    assert np.percentile(tight, 10) * 0.8 > 13.24  # the seed paper's rule would flag it
    assert item.widened and item.value == pytest.approx(0.9 * 13.24, rel=1e-3)
    assert item.value <= 0.9 * 13.24
    item = learn("condition_number_max", [2.0] * 9 + [100.0], "ceiling", rule, None, "")
    assert item.widened and item.value >= 100 / 0.9
    singular = learn("condition_number_max", [2.0] * 9 + [math.inf], "ceiling", rule, None, "")
    assert singular.value is None and "singular" in singular.note
    small = learn("stable_rank_min", [6.9], "floor", rule, 1.2, "shipped rule of its role")
    assert small.source == "fallback" and small.value == 1.2 and not small.widened
    small = learn("stable_rank_min", [1.1], "floor", rule, 1.2, "shipped rule of its role")
    assert small.widened and small.value == pytest.approx(0.99)


@pytest.mark.parametrize("x", [13.5449, 13.5451, 0.99995, 1e-7 * 3.14159, 123456.7, 5.0])
def test_rounding_never_crosses_a_reference(x):
    down, up = round_toward(x, "floor"), round_toward(x, "ceiling")
    assert down <= x <= up
    assert down == pytest.approx(x, rel=2e-3) and up == pytest.approx(x, rel=2e-3)
    assert len(f"{down:.6g}".replace(".", "").lstrip("0").split("e")[0].rstrip("0")) <= 4


# ----------------------------------------------------------------------------------------------
# Constructed checkpoints


def spectrum_matrix(rows: int, cols: int, s: np.ndarray, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` with Haar-random orthonormal U, V (exact prescribed spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    s = s[:k]
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(s) @ V.T).float().contiguous()


def power_law(k: int, p: float) -> np.ndarray:
    return np.arange(1, k + 1, dtype=np.float64) ** -p


def constructed_model(dead: bool = False) -> dict[str, torch.Tensor]:
    """A transformer-shaped checkpoint: 8 attention matrices (one with a low stable-rank
    outlier), 3 MLP matrices (one under the shipped stable-rank floor), one output head, one
    position table of stable rank ~2, token and token-type embeddings, two conv kernels."""
    d = 64
    t: dict[str, torch.Tensor] = {}
    for i in range(8):
        p = 0.35 + 0.02 * i if i != 5 else 0.9  # layer 5's key: a low outlier
        name = ("query", "key", "value", "output.dense")[i % 4]
        t[f"encoder.layer.{i // 4}.attention.{name}.weight"] = spectrum_matrix(
            d, d, power_law(d, p), seed=i)
    t["encoder.layer.0.intermediate.dense.weight"] = spectrum_matrix(96, d, power_law(d, 0.4),
                                                                    10)
    t["encoder.layer.0.output.dense.weight"] = spectrum_matrix(d, 96, power_law(d, 0.5), 11)
    low = np.concatenate([[1.0, 0.6], np.full(d - 2, 0.01)])  # stable rank ~1.36 < 1.5
    t["encoder.layer.1.intermediate.dense.weight"] = spectrum_matrix(96, d, low, 12)
    t["cls.predictions.decoder.weight"] = spectrum_matrix(100, d, power_law(d, 0.5), 13)
    pos = np.concatenate([[1.0, 0.8, 0.3], np.full(d - 3, 0.005)])
    t["embeddings.position_embeddings.weight"] = spectrum_matrix(40, d, pos, 14)
    t["embeddings.word_embeddings.weight"] = spectrum_matrix(100, d, power_law(d, 0.3), 15)
    t["embeddings.token_type_embeddings.weight"] = spectrum_matrix(2, d, np.array([1.0, 0.5]),
                                                                   16)
    g = torch.Generator().manual_seed(17)
    t["frontend.conv1.weight"] = torch.randn(32, 16, 3, generator=g)
    t["frontend.conv2.weight"] = torch.randn(32, 32, 3, generator=g) * 0.1
    if dead:
        w = t["encoder.layer.0.output.dense.weight"].clone()
        w[:6] = 0  # 6 of 64 all-zero rows: dead units, a limit calibration does not learn
        t["encoder.layer.0.output.dense.weight"] = w
    return t


@pytest.fixture(scope="module")
def constructed(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("constructed") / "model.safetensors"
    save_file(constructed_model(), str(path))
    return path


def test_constructed_model_passes_its_own_thresholds(constructed, tmp_path):
    shipped = default_thresholds()
    before = spectral_guard.audit(constructed)
    sr = {m.name: m.stable_rank for m in before.matrices}
    # the cases are real: the outlier is under P10 x 0.8 of its group, the small MLP under the
    # shipped default floor, the position table far under the hidden layers
    attention = [v for n, v in sr.items() if ".attention." in n]
    assert sr["encoder.layer.1.attention.key.weight"] < 0.8 * np.percentile(attention, 10)
    assert sr["encoder.layer.1.intermediate.dense.weight"] < shipped.default.stable_rank_min
    cal = calibrate(constructed)
    assert cal.self_audit.clean, cal.self_audit.describe()
    groups = {g.name: g for g in cal.groups}
    assert groups["conv"].matrices == 2 and groups["mlp"].matrices == 3
    assert groups["position_embeddings"].matrices == 1 and groups["heads"].matrices == 1
    assert groups["embeddings"].matrices == 2
    assert groups["attention"].learned["stable_rank_min"].widened
    assert groups["mlp"].fallback and groups["mlp"].learned["stable_rank_min"].widened
    path = tmp_path / "t.json"
    cal.thresholds.save(path)
    th = load_thresholds(path)
    # a group of 1-3 never gets the hidden-layer rule; the position table keeps its role's
    pos = th.rule_for("embeddings.position_embeddings.weight")
    # (embeddings and heads ship no stable-rank floor: judged by erank/k, which they pass)
    assert shipped.rule_for("transformer.wpe.weight").stable_rank_min is None
    assert pos.stable_rank_min is None and th.default.stable_rank_min is not None
    assert pos.effective_rank_ratio_min <= shipped.rule_for(
        "transformer.wpe.weight").effective_rank_ratio_min < th.default.effective_rank_ratio_min
    assert th.group_for("frontend.conv1.weight") == "conv"
    assert th.group_for("encoder.layer.0.attention.query.weight") == "attention"
    after = spectral_guard.audit(constructed, thresholds=path)
    assert after.exit_code == 0
    assert [m.name for m in after.matrices if m.status != "ok"] == []
    assert len(after.matrices) == len(before.matrices) == 17


def test_conv_kernels_do_not_poison_another_family(family, tmp_path):  # noqa: F811
    # a conv model dominated by a long, perfectly conditioned basis (an STFT), once read by the
    # audit as 258 "experts" of 1 x 256 with condition number 1
    basis = torch.linalg.qr(torch.randn(256, 256, generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64))[0][:, :].float()
    conv = {"stft.forward_basis_buffer": torch.cat([basis, basis[:2]])[:, None, :].contiguous(),
            "encoder.conv1.weight": torch.randn(64, 32, 5) * 0.05,
            "rnn.weight_ih_l0": spectrum_matrix(96, 64, power_law(64, 0.5), 3),
            "rnn.weight_hh_l0": spectrum_matrix(96, 32, power_law(32, 0.5), 4)}
    path = tmp_path / "conv.safetensors"
    save_file(conv, str(path))
    cal = calibrate(path)
    assert cal.self_audit.clean, cal.self_audit.describe()
    out = tmp_path / "t.json"
    cal.thresholds.save(out)
    th = load_thresholds(out)
    members = {m.name for m in cal.matrices if th.group_for(m.name) == "conv"}
    assert members and all(n.startswith(("stft.", "encoder.conv1")) for n in members)
    # the conv statistics stay in the conv group: no hidden group learned from them
    assert cal.glob.matrices == 2  # the two GRU matrices
    assert th.rule_for("model.layers.0.self_attn.q_proj.weight").condition_number_max is None
    report = spectral_guard.audit(family.held_out, thresholds=out)
    assert report.exit_code == 0
    assert not [m.name for m in report.matrices if m.status in ("ill_conditioned",
                                                                "collapsed")]


def test_a_flagged_reference_is_refused_unless_forced(tmp_path):
    ref = tmp_path / "dead.safetensors"
    save_file(constructed_model(dead=True), str(ref))
    out = tmp_path / "t.json"
    r = runner.invoke(app, ["calibrate", str(ref), "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert not out.exists()
    err = r.stderr
    assert "error: the new thresholds flag 1 of 17 reference matrices" in err
    assert "encoder.layer.0.output.dense.weight dead_units (6/64 all-zero rows" in err
    assert "nothing written (--force writes it anyway)" in err
    assert "Nothing written" in r.stdout and "Self-audit" not in r.stdout
    r = runner.invoke(app, ["calibrate", str(ref), "-o", str(out), "--force", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["written"] and doc["refused"] == [] and out.exists()
    assert any("written anyway (--force)" in w for w in doc["warnings"])
    assert doc["self_audit"]["names"] == ["encoder.layer.0.output.dense.weight"]
    assert doc["self_audit"]["statuses"] == {"encoder.layer.0.output.dense.weight":
                                             "dead_units"}


def test_refused_random_references_print_no_self_audit(family, tmp_path):  # noqa: F811
    r = runner.invoke(app, ["calibrate", str(family.random_init), "-o", str(tmp_path / "t")])
    assert r.exit_code == 1
    assert "Nothing written" in r.stdout and "Self-audit" not in r.stdout


def test_logit_limits_are_shipped_and_only_raised_to_pass_a_reference():
    rule = CalibrationRule()
    many = [float(v) for v in range(5, 25)]  # 20 healthy pairs, all under the shipped 32
    item = learn("logit_typical_max", many, "ceiling", rule, 32.0, "shipped", False)
    assert item.value == 32.0 and not item.widened  # never tightened by one model's spread
    item = learn("logit_typical_max", [*many, 40.0], "ceiling", rule, 32.0, "shipped", False)
    assert item.widened and item.value >= 40.0 / 0.9
    item = learn("logit_scale_max", [300.0, 900.0], "ceiling", rule, None, "shipped", False)
    assert item.value is None  # a limit the shipped rule leaves off stays off


def test_logit_provenance_matches_the_file(family, tmp_path):  # noqa: F811
    shipped = default_thresholds().default
    q_name = "model.layers.0.self_attn.q_proj.weight"
    cal = calibrate(family.references[0])  # no config.json: the audit measures no pair
    prov = cal.thresholds.provenance["q_k_logit_scale"]
    assert "no attention pair" in prov and "not reported" not in prov
    rule = cal.thresholds.rule_for(q_name)
    assert rule.logit_typical_max == shipped.logit_typical_max
    assert rule.logit_scale_max == shipped.logit_scale_max
    folder = tmp_path / "with_config"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(family.references[0].read_bytes())
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    cal = calibrate(folder / "model.safetensors")
    prov = cal.thresholds.provenance["q_k_logit_scale"]
    typical = [m.logit_typical for m in cal.matrices if m.logit_typical is not None]
    assert len(typical) == 4 and "2 attention pair(s)" in prov  # q and k of 2 layers
    assert "logit_typical_max" in prov and "shipped" in prov
    limit = cal.thresholds.rule_for(q_name).logit_typical_max
    assert limit == max(shipped.logit_typical_max, round_toward(max(typical) / 0.9, "ceiling"))
    assert cal.self_audit.clean


@pytest.mark.skipif(not TRAINED.is_dir(), reason="no committed trained fixtures")
@pytest.mark.parametrize("path", sorted(TRAINED.rglob("*.safetensors")) or [None])
def test_trained_fixtures_pass_their_own_calibration(path, tmp_path):
    if path is None:
        pytest.skip("no safetensors under tests/data/trained")
    cal = calibrate(path)
    assert not cal.looks_random
    assert cal.self_audit.clean, cal.self_audit.describe()
    out = tmp_path / "t.json"
    cal.thresholds.save(out)
    report = spectral_guard.audit(path, thresholds=out)
    assert report.exit_code == 0
    assert [m.name for m in report.matrices if m.status != "ok"] == []
