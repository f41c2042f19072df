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
    # embeddings and heads: judged by the spread of the spectrum only (a dominant shared
    # direction is expected: gpt2-stdlib's byte-level wte reads SR 1.05, row SR 1.46,
    # erank/k 0.27)
    assert emb.stable_rank_min is None and hidden.stable_rank_min == 1.5
    assert emb.effective_rank_ratio_min < hidden.effective_rank_ratio_min
    byte_wte = healthy(rows=256, cols=128, min_dim=128, stable_rank=1.05, row_stable_rank=1.46,
                       effective_rank_ratio=0.27)
    assert judge(byte_wte, emb) == ("ok", [])
    assert judge(byte_wte, hidden)[0] == "collapsed"
    # a rank-1 embedding still fails: erank / k = 1 / 128
    rank1 = healthy(rows=256, cols=128, min_dim=128, stable_rank=1.0, row_stable_rank=1.0,
                    effective_rank_ratio=1 / 128)
    assert judge(rank1, emb) == ("collapsed", [f"effective-rank ratio {1 / 128:.4g} < 0.05"])


SHIPPED_HIDDEN = default_thresholds().rule_for("model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("kw, expected", [
    # silero-vad conv4 as the biopsy reads it: one direction holds the energy, but a few
    # output channels of large norm point different ways -> not collapse (and its low erank,
    # the same few channels, is not read either)
    (dict(stable_rank=1.066, row_stable_rank=9.44, effective_rank_ratio=0.1525), []),
    # a spike W + 3 ||W||_F u v^T: energy in one direction and the rows aligned
    (dict(stable_rank=1.11, row_stable_rank=1.5, effective_rank_ratio=0.4),
     ["stable rank 1.11 < 1.5 and row-normalized stable rank 1.5 < 4"]),
    # rank 1: both floors, and the erank floor too
    (dict(stable_rank=1.0, row_stable_rank=1.0, effective_rank_ratio=0.01),
     ["stable rank 1 < 1.5 and row-normalized stable rank 1 < 4",
      "effective-rank ratio 0.01 < 0.2"]),
    # rank 4 at equal norm: SR above the floor, the erank floor catches it (row SR <= rank)
    (dict(stable_rank=3.2, row_stable_rank=3.1, effective_rank_ratio=0.04),
     ["effective-rank ratio 0.04 < 0.2"]),
    # a healthy hidden matrix whose rows share a direction (khmer-ocr's classifier fc:
    # SR 1.62, row SR 1.43, erank/k 0.6): the energy is not in one direction
    (dict(stable_rank=1.62, row_stable_rank=1.43, effective_rank_ratio=0.6), []),
    # exactly at the row floor is spread (strict "<")
    (dict(stable_rank=1.1, row_stable_rank=4.0, effective_rank_ratio=0.1), []),
])
def test_collapse_law_reads_the_rows_where_one_direction_dominates(kw, expected):
    got = judge(healthy(**kw), SHIPPED_HIDDEN)
    assert got == (("collapsed", expected) if expected else ("ok", []))


def test_collapse_law_without_a_row_value_or_floor_is_the_stable_rank_floor():
    dominated = dict(stable_rank=1.1, row_stable_rank=9.0, effective_rank_ratio=0.1)
    off = Rule(stable_rank_min=1.5, row_stable_rank_min=None, effective_rank_ratio_min=0.2)
    assert judge(healthy(**dominated), off) == (
        "collapsed", ["stable rank 1.1 < 1.5", "effective-rank ratio 0.1 < 0.2"])
    unmeasured = dict(dominated, row_stable_rank=None)
    assert judge(healthy(**unmeasured), SHIPPED_HIDDEN) == (
        "collapsed", ["stable rank 1.1 < 1.5", "effective-rank ratio 0.1 < 0.2"])
    assert judge(healthy(**dominated), SHIPPED_HIDDEN) == ("ok", [])
    # below collapse_min_dim no collapse check runs
    assert judge(healthy(min_dim=4, stable_rank=1.0, row_stable_rank=1.0), SHIPPED_HIDDEN)[0] \
        == "ok"


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
