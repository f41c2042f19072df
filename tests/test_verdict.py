"""verdict.py: each status from its threshold, precedence, reasons, switched-off checks."""

from __future__ import annotations

import math

import pytest

from spectral_guard.thresholds import Rule, default_thresholds
from spectral_guard.verdict import STATUSES, Observation, judge

RULE = Rule(stable_rank_min=1.5, stable_rank_ratio_min=0.01, effective_rank_ratio_min=0.1,
            condition_number_max=1e5, dead_unit_fraction_max=0.02,
            duplicate_row_fraction_max=0.05, alpha_min=1.5, alpha_max=8.0, collapse_min_dim=8)


def healthy(**kw) -> Observation:
    base = dict(min_dim=64, rows=64, cols=128, stable_rank=20.0, stable_rank_ratio=0.3,
                effective_rank_ratio=0.8, condition_number=10.0, alpha=3.0,
                duplicate_rows=0, duplicate_sample=64)
    base.update(kw)
    return Observation(**base)


def test_healthy_is_ok():
    assert judge(healthy(), RULE) == ("ok", [])


@pytest.mark.parametrize("kw, status, needle", [
    (dict(nonfinite=3), "nonfinite", "3 of 8192 entries are NaN/Inf"),
    (dict(dead_rows=2), "dead_units", "2/64 all-zero rows"),
    (dict(dead_cols=3), "dead_units", "3/128 all-zero columns"),
    (dict(dead_rows=64), "dead_units", "all entries are zero"),
    (dict(stable_rank=1.2), "collapsed", "stable rank 1.2 < 1.5"),
    (dict(stable_rank_ratio=0.005), "collapsed", "stable-rank ratio 0.005 < 0.01"),
    (dict(effective_rank_ratio=0.05), "collapsed", "effective-rank ratio 0.05 < 0.1"),
    (dict(condition_number=2e5), "ill_conditioned", "kappa 2e+05 > 1e+05"),
    (dict(condition_number=math.inf), "ill_conditioned", "singular"),
    (dict(duplicate_rows=10), "suspicious", "10/64 near-duplicate rows"),
    (dict(alpha=1.2), "suspicious", "alpha 1.2 < 1.5"),
    (dict(alpha=9.0), "suspicious", "alpha 9 > 8"),
])
def test_each_check_gives_its_status_and_reason(kw, status, needle):
    got, reasons = judge(healthy(**kw), RULE)
    assert got == status
    assert len(reasons) == 1 and needle in reasons[0]


def test_boundaries_are_strict():
    # exactly at the threshold passes: collapsed is "<", ill_conditioned is ">"
    assert judge(healthy(stable_rank=1.5, effective_rank_ratio=0.1, condition_number=1e5,
                         dead_rows=0, duplicate_rows=3), RULE)[0] == "ok"
    # 0.02 dead fraction exactly: 2/100 is not > 0.02
    assert judge(healthy(rows=100, dead_rows=2), RULE)[0] == "ok"


def test_precedence_and_all_reasons_listed():
    obs = healthy(nonfinite=1, dead_rows=5, stable_rank=1.1, condition_number=1e9,
                  duplicate_rows=30)
    status, reasons = judge(obs, RULE)
    assert status == "nonfinite"
    assert len(reasons) == 5
    # reasons are ordered by the precedence of the status they belong to
    assert "NaN" in reasons[0] and "all-zero" in reasons[1] and "stable rank" in reasons[2]
    assert "kappa" in reasons[3] and "near-duplicate" in reasons[4]
    order = [judge(healthy(**kw), RULE)[0] for kw in (
        dict(nonfinite=1, dead_rows=5), dict(dead_rows=5, stable_rank=1.0),
        dict(stable_rank=1.0, condition_number=1e9), dict(condition_number=1e9, alpha=1.0))]
    assert order == list(STATUSES[:4])


def test_none_threshold_switches_check_off_and_none_metric_never_fails():
    off = Rule()
    obs = healthy(dead_rows=30, stable_rank=1.0, effective_rank_ratio=0.0,
                  condition_number=math.inf, alpha=0.5, duplicate_rows=60)
    assert judge(obs, off) == ("ok", [])
    missing = Observation(min_dim=64, rows=64, cols=64)
    assert judge(missing, RULE) == ("ok", [])


def test_all_zero_matrix_is_dead_even_with_dead_check_off():
    assert judge(healthy(dead_rows=64), Rule())[0] == "dead_units"


def test_collapse_checks_skip_thin_matrices():
    thin = healthy(min_dim=1, rows=1, stable_rank=1.0, stable_rank_ratio=1.0,
                   effective_rank_ratio=1.0)
    assert judge(thin, RULE)[0] == "ok"
    assert judge(healthy(min_dim=4, stable_rank=1.0), RULE)[0] == "ok"
    assert judge(healthy(min_dim=8, stable_rank=1.0), RULE)[0] == "collapsed"


def test_default_thresholds_resolve_embedding_group():
    th = default_thresholds()
    hidden = th.rule_for("model.layers.0.mlp.up_proj.weight")
    emb = th.rule_for("model.embed_tokens.weight")
    head = th.rule_for("lm_head.weight")
    assert th.group_for("model.embed_tokens.weight") == "embeddings_and_heads"
    assert th.group_for("model.layers.0.mlp.up_proj.weight") is None
    assert emb == head
    assert emb.stable_rank_min < hidden.stable_rank_min
    assert emb.effective_rank_ratio_min < hidden.effective_rank_ratio_min
    between = healthy(stable_rank=(emb.stable_rank_min + hidden.stable_rank_min) / 2)
    assert judge(between, hidden)[0] == "collapsed"
    assert judge(between, emb)[0] == "ok"
    assert judge(healthy(stable_rank=1.0), emb)[0] == "collapsed"  # rank 1 is caught everywhere


def test_logit_risk_reads_the_typical_scale_and_a_set_bound_only():
    shipped = default_thresholds().rule_for("model.layers.0.self_attn.q_proj.weight")
    limit = shipped.logit_typical_max
    assert limit is not None and shipped.logit_scale_max is None
    # a huge worst-case bound alone is not a finding under the shipped rule (healthy encoders
    # reach 2293 at n = 384)
    assert judge(healthy(logit_scale=1e5, logit_typical=limit * 0.99), shipped) == ("ok", [])
    status, reasons = judge(healthy(logit_scale=10.0, logit_typical=limit * 1.01), shipped)
    assert status == "logit_risk" and reasons == [
        f"typical q-k logit {limit * 1.01:.4g} > {limit:.4g}"]
    # a ceiling on the bound applies only when a thresholds file sets one; both reasons listed
    capped = Rule(logit_typical_max=32.0, logit_scale_max=500.0)
    assert judge(healthy(logit_scale=499.0, logit_typical=1.0), capped) == ("ok", [])
    assert judge(healthy(logit_scale=501.0, logit_typical=40.0), capped) == (
        "logit_risk", ["typical q-k logit 40 > 32", "q-k logit bound 501 > 500"])
    # not measured (not part of a pair): never a finding
    assert judge(healthy(), capped) == ("ok", [])
    # below collapsed in precedence, above suspicious
    assert judge(healthy(logit_typical=40.0, stable_rank=1.0),
                 Rule(logit_typical_max=32.0, stable_rank_min=1.5))[0] == "collapsed"
    assert judge(healthy(logit_typical=40.0, alpha=1.0),
                 Rule(logit_typical_max=32.0, alpha_min=1.5))[0] == "logit_risk"
