"""Offline calibration (``spectral_guard.calibration``): the law (floors and ceilings that pass
their references), groups and fallbacks, the Marchenko-Pastur random-weights check, provenance,
run-derived guard fields, and the learned file used by the audit and the guard. Models are
trained on CPU in the session fixture ``family`` (tests/calibrate_family.py)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from audit_fixtures import gaussian_matrices, write_sharded
from calibrate_family import family  # noqa: F401  (session fixture)
from safetensors.torch import save_file

import spectral_guard
from spectral_guard.calibration import (
    CalibrationRule,
    RuleError,
    calibrate,
    learn_retention,
    mp_statistics,
    percentile,
    random_check,
    rejudge,
)
from spectral_guard.random_init import MP_EDGE_MAX, MP_ERANK_MIN, mp_effective_rank, mp_quantiles
from spectral_guard.sensors import effective_rank_from_sv
from spectral_guard.thresholds import (
    SCHEMA_VERSION,
    Thresholds,
    ThresholdsError,
    default_thresholds,
    load_thresholds,
    role_group,
)

# ----------------------------------------------------------------------------------------------
# Math against independent references


@pytest.mark.parametrize("q", [0, 5, 10, 37.5, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    rng = np.random.default_rng(int(q * 10))
    for n in (1, 2, 7, 40):
        x = rng.lognormal(size=n)
        assert percentile(list(x), q) == pytest.approx(float(np.percentile(x, q)), rel=1e-12)


def test_percentile_with_infinite_values():
    x = [1.0, 2.0, 3.0, math.inf]
    assert percentile(x, 50) == pytest.approx(np.percentile(x, 50))
    assert percentile(x, 90) == math.inf  # the interpolation touches inf
    assert percentile(x, 100) == math.inf
    with pytest.raises(ValueError):
        percentile([], 10)


@pytest.mark.parametrize("p,q", [(64, 64), (96, 128), (50, 400)])
def test_mp_quantiles_moments_are_the_closed_forms(p, q):
    # Marchenko-Pastur with variance 1 and ratio y: mean 1, variance y, support [a, b]
    y = p / q
    x = np.array(mp_quantiles(p, q))
    assert np.all(np.diff(x) > 0)
    assert (1 - math.sqrt(y)) ** 2 <= x[0] and x[-1] <= (1 + math.sqrt(y)) ** 2
    assert x.mean() == pytest.approx(1.0, abs=2e-3)
    assert x.var() == pytest.approx(y, rel=0.03)


def test_mp_quantiles_match_a_large_gaussian_matrix():
    p, q = 300, 600
    g = torch.Generator().manual_seed(0)
    W = torch.randn(q, p, generator=g, dtype=torch.float64)
    eig = np.sort(np.linalg.eigvalsh((W.T @ W).numpy() / q))
    quant = np.array(mp_quantiles(p, q))
    assert np.max(np.abs(eig - quant)) < 0.06  # edge fluctuations ~ q^(-2/3)
    assert np.median(np.abs(eig - quant)) < 0.01
    s = torch.linalg.svdvals(W)
    assert float(effective_rank_from_sv(s)) / mp_effective_rank(p, q) == pytest.approx(1, abs=3e-3)


def _audit_stats(path) -> list[tuple[str, float, float]]:
    report = spectral_guard.audit(path)
    return [(m.name, *mp_statistics(m)) for m in report.matrices if mp_statistics(m)]


def test_random_weights_detected_trained_references_not(family):  # noqa: F811
    random_stats = _audit_stats(family.random_init)
    assert random_stats and all(e <= MP_EDGE_MAX and r >= MP_ERANK_MIN
                                for _n, e, r in random_stats)
    for ref in family.references:
        report = spectral_guard.audit(ref)
        check = random_check(report.matrices)
        assert not check.looks_random, (ref, check)
        assert check.mp_like <= 6  # only the small embeddings/heads stay near MP
        hidden = [(n, e, r) for n, e, r in _audit_stats(ref) if role_group(n) in ("attention",
                                                                                  "mlp")]
        assert all(e > MP_EDGE_MAX or r < MP_ERANK_MIN for _n, e, r in hidden)
    assert random_check(spectral_guard.audit(family.random_init).matrices).looks_random


# ----------------------------------------------------------------------------------------------
# The rule, groups and fallbacks


@pytest.fixture(scope="module")
def calibration(family):  # noqa: F811
    return calibrate(family.references)


def law_floor(x, q=10, margin=0.8, ref=0.9) -> float:
    """The law, from numpy: min(P_q x margin, ref x smallest)."""
    return min(np.percentile(x, q) * margin, ref * np.min(x))


def law_ceiling(x, q=90, margin=1.5, ref=0.9) -> float:
    return max(np.percentile(x, q) * margin, np.max(x) / ref)


def test_learned_values_follow_the_law(family, calibration):  # noqa: F811
    # independent recomputation: numpy percentiles of the audit's own metrics
    mats = [m for ref in family.references for m in spectral_guard.audit(ref).matrices]
    th = calibration.thresholds
    for group in ("attention", "mlp"):
        members = [m for m in mats if role_group(m.name) == group]
        g = next(g for g in calibration.groups if g.name == group)
        assert not g.fallback and g.matrices == len(members) >= 8
        rule = th.rule_for(members[0].name)
        sr = np.array([m.stable_rank for m in members])
        er = np.array([m.effective_rank_ratio for m in members])
        kappa = np.array([m.condition_number for m in members])
        alpha = np.array([m.alpha for m in members])
        for value, expected in ((rule.stable_rank_min, law_floor(sr)),
                                (rule.effective_rank_ratio_min, law_floor(er)),
                                (rule.alpha_min, law_floor(alpha))):
            assert value == pytest.approx(expected, rel=1e-3) and value <= expected
        for value, expected in ((rule.condition_number_max, law_ceiling(kappa)),
                                (rule.alpha_max, law_ceiling(alpha))):
            assert value == pytest.approx(expected, rel=1e-3) and value >= expected
        assert g.learned["stable_rank_min"].at_percentile == pytest.approx(
            np.percentile(sr, 10), rel=1e-9)
    # the global rule: every hidden-layer matrix (attention and MLP here), nothing else
    hidden = [m for m in mats if role_group(m.name) in ("attention", "mlp")]
    assert calibration.glob.matrices == len(hidden) == 36
    srr = np.array([m.stable_rank_ratio for m in hidden])
    assert th.default.stable_rank_ratio_min == pytest.approx(law_floor(srr), rel=1e-3)


def test_small_groups_start_from_the_shipped_rule_of_their_role(calibration):
    th = calibration.thresholds
    shipped = default_thresholds().rule_for("lm_head.weight")  # the relaxed embeddings rule
    by_name = {g.name: g for g in calibration.groups}
    for group, name in (("heads", "lm_head.weight"),
                        ("position_embeddings", "model.embed_positions.weight"),
                        ("embeddings", "model.embed_tokens.weight")):
        g = by_name[group]
        assert g.fallback and g.matrices == 3, group
        rule = th.rule_for(name)
        own = [m for m in calibration.matrices if m.name == name]
        for field, metric in (("stable_rank_min", "stable_rank"),
                              ("effective_rank_ratio_min", "effective_rank_ratio")):
            if getattr(shipped, field) is None:  # off in its role's shipped rule: stays off
                assert getattr(rule, field) is None, (group, field)  # (SR of embeddings/heads)
                continue
            expected = min(getattr(shipped, field), 0.9 * min(getattr(m, metric) for m in own))
            assert getattr(rule, field) == pytest.approx(expected, rel=1e-3), (group, field)
            # never the hidden-layer rule
            assert getattr(rule, field) != getattr(th.default, field)
        assert rule.condition_number_max is None and rule.alpha_min is None
        assert rule.effective_rank_retention_min is None  # never penalized by the guard
    assert th.rule_for("model.layers.0.mlp.up_proj.weight").effective_rank_retention_min == 0.5
    assert not any("fewer than" in w for w in calibration.warnings)  # normal, not a warning
    # every role group is written, so role classification survives a fallback
    assert [g.name for g in th.groups] == ["heads", "position_embeddings", "embeddings",
                                           "attention", "mlp", "other"]
    assert th.group_for("lm_head.weight") == "heads"
    assert calibration.self_audit.clean, calibration.self_audit.describe()


def test_min_group_and_margins_are_options(family):  # noqa: F811
    rule = CalibrationRule(floor_percentile=5, floor_margin=0.5, ceiling_percentile=95,
                           ceiling_margin=2.0, min_group=30)
    cal = calibrate(family.references, rule=rule)
    assert all(g.fallback for g in cal.groups)  # no group has 30 matrices
    assert cal.self_audit.clean
    learned = cal.glob.learned["stable_rank_min"]
    assert learned.source == "percentile" and learned.n == 36  # the global pool has 36
    rule = CalibrationRule(floor_percentile=5, floor_margin=0.5, min_group=4)
    learned = calibrate(family.references, rule=rule).glob.learned["stable_rank_min"]
    assert (learned.percentile, learned.margin) == (5, 0.5)
    assert learned.value == pytest.approx(min(learned.at_percentile * 0.5,
                                              0.9 * learned.extreme), rel=1e-3)
    for bad, option in ((dict(floor_percentile=120), "floor_percentile"),
                        (dict(ceiling_margin=0), "ceiling_margin"),
                        (dict(min_group=0), "min_group"),
                        (dict(reference_margin=1.5), "reference_margin"),
                        (dict(reference_margin=0), "reference_margin")):
        with pytest.raises(RuleError) as err:
            CalibrationRule(**bad)
        # the library names its own parameter, never a CLI flag (the CLI translates)
        assert err.value.option == option and "--" not in str(err.value)


def test_role_groups_from_names():
    cases = {
        "model.layers.0.self_attn.q_proj.weight": "attention",
        "transformer.h.0.attn.c_attn.weight": "attention",  # fused qkv (GPT-2)
        "gpt_neox.layers.0.attention.query_key_value.weight": "attention",
        "transformer.h.0.mlp.c_proj.weight": "mlp",
        "model.layers.0.mlp.gate_proj.weight": "mlp",
        "layers.0.feed_forward.w3.weight": "mlp",
        "encoder.layer.0.output.dense.weight": "mlp",
        "model.embed_tokens.weight": "embeddings",
        "transformer.wte.weight": "embeddings",
        "embeddings.word_embeddings.weight": "embeddings",
        "embeddings.token_type_embeddings.weight": "embeddings",
        "text_model.embeddings.token_embedding.weight": "embeddings",
        "transformer.wpe.weight": "position_embeddings",
        "embeddings.position_embeddings.weight": "position_embeddings",
        "model.decoder.embed_positions.weight": "position_embeddings",
        "text_model.embeddings.position_embedding.weight": "position_embeddings",
        "encoder.layer.0.attention.self.key.weight": "attention",
        "lm_head.weight": "heads",
        "gpt_neox.embed_out.weight": "heads",
        "output.weight": "heads",
        "model.norm.weight": "other",
        "vision.patch_proj.weight": "other",
    }
    assert {n: role_group(n) for n in cases} == cases


# ----------------------------------------------------------------------------------------------
# Calibrated thresholds in use


def test_held_out_member_passes_damaged_variants_fail(family, calibration, tmp_path):  # noqa: F811
    path = tmp_path / "thresholds.json"
    calibration.thresholds.save(path)
    healthy = spectral_guard.audit(family.held_out, thresholds=path)
    assert healthy.exit_code == 0, healthy.verdict_text()
    statuses = {m.name: m.status for m in healthy.matrices}
    # No collapse or hygiene flag on a model the references did not include. The kappa
    # ceiling may mark a healthy attention projection ill_conditioned (measured kappa of
    # healthy q/k/v reaches 3.7e4 and inf, docs/calibration.md), and the power-law alpha of a
    # 128 x 80 biopsy can sit far out of the references' range (held-out up_proj: 6.06 against
    # 1.8-2.6): neither is in the default --fail-on.
    odd = {n: s for n, s in statuses.items() if s != "ok"}
    reasons = {m.name: m.reasons for m in healthy.matrices}
    assert all((s == "ill_conditioned" and role_group(n) == "attention")
               or (s == "suspicious" and all(r.startswith("alpha") for r in reasons[n]))
               for n, s in odd.items()), {n: reasons[n] for n in odd}
    assert len(odd) <= 2
    expected = {"rank1": ("model.layers.1.mlp.up_proj.weight", "collapsed"),
                "dead_rows": ("model.layers.0.mlp.down_proj.weight", "dead_units"),
                "nan": ("model.layers.0.self_attn.v_proj.weight", "nonfinite")}
    for kind, damaged in family.damaged.items():
        report = spectral_guard.audit(damaged, thresholds=path)
        name, status = expected[kind]
        assert report.exit_code == 1
        assert {m.name: m.status for m in report.matrices}[name] == status
        assert [m.name for m in report.failing] == [name]


def test_rejudge_equals_a_real_audit_with_the_file(family, calibration, tmp_path):  # noqa: F811
    path = tmp_path / "t.json"
    calibration.thresholds.save(path)
    again = rejudge(calibration.matrices, load_thresholds(path))
    real = [m for ref in family.references
            for m in spectral_guard.audit(ref, thresholds=path).matrices]
    flagged = sorted(m.name for m in real if m.status != "ok")
    assert sorted(again.names) == flagged
    assert again.matrices == len(real)
    assert calibration.self_audit.names == again.names


def test_file_round_trips_and_the_guard_reads_it(family, calibration, tmp_path):  # noqa: F811
    path = tmp_path / "t.json"
    calibration.thresholds.save(path)
    back = load_thresholds(path)
    assert back.to_dict() == calibration.thresholds.to_dict()
    assert Thresholds.from_dict(json.loads(path.read_text())).to_dict() == back.to_dict()
    from audit_fixtures import tiny_models

    from spectral_guard.guard.config import GuardConfig

    model = tiny_models.CharLM(30, 64, 4, 256, 2, 32)
    cfg = GuardConfig.coerce(str(path))
    name = "model.layers.0.mlp.up_proj.weight"
    assert cfg.resolved_thresholds().rule_for(name) == back.rule_for(name)
    guard = spectral_guard.instrument(model, str(path))
    try:
        out = model(torch.zeros(2, 8, dtype=torch.long))
        assert out.shape == (2, 8, 30)
    finally:
        spectral_guard.remove(model)
    assert guard is not None


def test_newer_schema_is_refused_in_one_line(calibration, tmp_path):
    doc = calibration.thresholds.to_dict()
    doc["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ThresholdsError) as err:
        load_thresholds(path)
    msg = str(err.value)
    assert "\n" not in msg and "newer" in msg and "upgrade" in msg


# ----------------------------------------------------------------------------------------------
# Provenance


def test_provenance_records_references_hashes_and_settings(family, calibration):  # noqa: F811
    prov = calibration.thresholds.provenance
    assert prov["tool"] == f"spectral_guard {spectral_guard.__version__}"
    assert prov["mode"] == "biopsy" and prov["limit"] == 128
    assert prov["rule"] == {"floor_percentile": 10.0, "floor_margin": 0.8,
                            "ceiling_percentile": 90.0, "ceiling_margin": 1.5, "min_group": 8,
                            "reference_margin": 0.9}
    assert prov["created"].endswith("Z") and prov["created"][:4].isdigit()
    assert "shipped defaults" in prov["guard_fields"]
    att = prov["groups"]["attention"]
    assert att["matrices"] == 24 and not att["fallback"]
    srm = att["thresholds"]["stable_rank_min"]
    assert (srm["percentile"], srm["margin"]) == (10.0, 0.8)
    assert srm["value"] == calibration.thresholds.rule_for("x.self_attn.q_proj.weight"
                                                           ).stable_rank_min
    assert prov["groups"]["heads"]["fallback"] and prov["groups"]["global"]["matrices"] == 36
    assert [r["path"] for r in prov["references"]] == [str(p) for p in family.references]
    for ref, path in zip(prov["references"], family.references, strict=True):
        (entry,) = ref["files"]
        data = path.read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    json.dumps(prov, allow_nan=False)  # plain JSON


def test_sharded_reference_hashes_the_index_and_every_shard(tmp_path):
    index = write_sharded(tmp_path / "ck", gaussian_matrices(), n_shards=2)
    cal = calibrate([index], rule=CalibrationRule(min_group=1))
    files = cal.references[0]["files"]
    assert len(files) == 3 and files[0]["path"] == str(index)
    for f in files:
        assert f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Guard fields from a run


def test_run_derives_retention_floors_from_drift(family):  # noqa: F811
    cal = calibrate(family.run, run=True)
    reports = [spectral_guard.audit(p).matrices for p in family.run]
    first = {m.name: m for m in reports[0]}
    drift = [r_m.effective_rank / first[r_m.name].effective_rank
             for later in reports[1:] for r_m in later if role_group(r_m.name) == "mlp"]
    rule = cal.thresholds.rule_for("model.layers.0.mlp.up_proj.weight")
    # the law, and a layer starts at retention 1
    expected = min(min(np.percentile(drift, 10), 1.0) * 0.8, 0.9 * min(drift))
    assert rule.effective_rank_retention_min == pytest.approx(expected, rel=1e-3)
    assert cal.thresholds.rule_for("lm_head.weight").effective_rank_retention_min is None
    assert "derived from a run of 3 checkpoints" in cal.thresholds.provenance["guard_fields"]
    # drift of a matrix against itself is 1: floors are exactly the margin
    same = learn_retention([reports[0], reports[0]], CalibrationRule())
    assert same["attention"]["effective_rank_retention_min"].value == pytest.approx(0.8)
    # 4 MLP drifts, fewer than min_group: the shipped value of the role, not another group's
    mlp = same["mlp"]["effective_rank_retention_min"]
    assert mlp.source == "fallback" and mlp.value == 0.5 and mlp.n == 4


def test_bad_inputs_raise_one_line_errors(tmp_path):
    from spectral_guard.checkpoint import CheckpointError

    vectors = tmp_path / "vectors.safetensors"
    save_file({"norm.weight": torch.ones(8), "bias": torch.zeros(4)}, str(vectors))
    with pytest.raises(CheckpointError, match="no matrices"):
        calibrate([vectors])
    with pytest.raises(ValueError, match="no reference"):
        calibrate([])
    with pytest.raises(ValueError, match="at least two") as err:
        calibrate([vectors], run=True)
    assert "--" not in str(err.value)  # the library names no CLI flag (the CLI says --run)


def test_in_memory_references_have_no_file_to_hash(family):  # noqa: F811
    from safetensors.torch import load_file

    state = load_file(str(family.references[0]))
    cal = calibrate([family.references[0], state])
    on_disk, in_memory = cal.references
    assert on_disk["files"] and in_memory["files"] == []
    assert in_memory["matrices"] == on_disk["matrices"] == 15
    assert cal.glob.matrices == 24  # the hidden-layer matrices of both


def test_retention_floor_never_above_the_start(family):  # noqa: F811
    # a "run" whose later checkpoint has higher effective ranks everywhere (the random init
    # after a trained model: erank grows) must not give a floor above 1 x margin
    reports = [spectral_guard.audit(p).matrices for p in (family.references[0],
                                                          family.references[0])]
    grown = [m for m in spectral_guard.audit(family.references[0]).matrices]
    for m in grown:
        m.effective_rank = m.effective_rank * 1.5 if m.effective_rank else m.effective_rank
    learned = learn_retention([reports[0], grown], CalibrationRule(min_group=1))
    item = learned["attention"]["effective_rank_retention_min"]
    assert item.at_percentile == pytest.approx(1.5)
    assert item.value == pytest.approx(0.8) and "limited to 1 x margin" in item.note
