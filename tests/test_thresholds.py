"""The thresholds file format: round trip, defaults, validation errors, group resolution.

The shipped default numbers are being calibrated, so these tests check structure and
behaviour, never the particular default values."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest

from spectral_guard.thresholds import (
    FORMAT,
    SCHEMA_VERSION,
    Group,
    Rule,
    Thresholds,
    ThresholdsError,
    default_thresholds,
    load_thresholds,
)

RULE_FIELDS = [f.name for f in fields(Rule)]


def _sample() -> Thresholds:
    return Thresholds(
        default=Rule(stable_rank_min=2.0, condition_number_max=1e4, alpha_min=1.5),
        groups=(
            Group("heads", r"(^|\.)lm_head\.", {"stable_rank_min": None, "alpha_min": 1.2}),
            Group("mlp", r"\.mlp\.", {"condition_number_max": 1e6}),
            Group("mlp_down", r"down_proj", {"condition_number_max": 5.0}),  # shadowed by mlp
        ),
        provenance={"source": "unit test", "seed": 3},
    )


def _write(tmp_path, data, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_round_trip(tmp_path):
    t = _sample()
    path = tmp_path / "thr.json"
    t.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == FORMAT and raw["schema_version"] == SCHEMA_VERSION
    assert set(raw["default"]) == set(RULE_FIELDS)  # every field written, null when off
    assert raw["default"]["stable_rank_ratio_min"] is None
    back = load_thresholds(path)
    assert back == t
    assert back.to_dict() == t.to_dict()
    # and again through the file: a fixed point
    back.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_defaults_load_and_are_well_formed():
    t = default_thresholds()
    assert t == load_thresholds(None)
    assert isinstance(t.default, Rule)
    for name in RULE_FIELDS:
        value = getattr(t.default, name)
        assert value is None or (isinstance(value, float) and math.isfinite(value)), name
    assert "embeddings_and_heads" in [g.name for g in t.groups]
    assert t.provenance.get("source")
    # the shipped file survives a round trip unchanged
    assert Thresholds.from_dict(t.to_dict()) == t
    # at least one check is on by default
    assert any(getattr(t.default, name) is not None for name in RULE_FIELDS)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight",
                                  "transformer.wte.weight", "transformer.wpe.weight",
                                  "bert.embeddings.word_embeddings.weight",
                                  "model.embed_out.weight", "classifier.weight"])
def test_embedding_and_head_names_hit_their_group(name):
    t = default_thresholds()
    assert t.group_for(name) == "embeddings_and_heads"
    group = next(g for g in t.groups if g.name == "embeddings_and_heads")
    rule = t.rule_for(name)
    for key, value in group.overrides.items():
        assert getattr(rule, key) == value
    for key in set(RULE_FIELDS) - set(group.overrides):
        assert getattr(rule, key) == getattr(t.default, key)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight",
                                  "model.layers.11.self_attn.q_proj.weight",
                                  "transformer.h.3.attn.c_attn.weight",
                                  "encoder.layer.2.output.dense.weight",
                                  "model.layers.5.mlp.gate_proj.weight",
                                  "model.layers.2.mlp.embedding_gate_proj.weight",
                                  "blocks.0.score_mlp.weight"])
def test_other_layers_use_the_default_rule(name):
    t = default_thresholds()
    assert t.group_for(name) is None
    assert t.rule_for(name) == t.default


def test_first_matching_group_wins():
    t = _sample()
    down = "model.layers.0.mlp.down_proj.weight"
    assert t.group_for(down) == "mlp"
    assert t.rule_for(down).condition_number_max == 1e6  # not mlp_down's 5.0
    assert t.rule_for(down).stable_rank_min == 2.0  # default kept where not overridden
    assert t.group_for("lm_head.weight") == "heads"
    assert t.rule_for("lm_head.weight").stable_rank_min is None  # null switches a check off
    assert t.rule_for("lm_head.weight").alpha_min == 1.2
    assert t.group_for("foo.down_proj.weight") == "mlp_down"
    assert t.rule_for("attn.o_proj.weight") == t.default
    # reordering the groups changes the winner
    swapped = Thresholds(t.default, (t.groups[2], t.groups[0], t.groups[1]))
    assert swapped.rule_for(down).condition_number_max == 5.0


def _valid() -> dict:
    return _sample().to_dict()


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["default"].update(stable_rank_floor=1.0), "stable_rank_floor"),
    (lambda d: d["groups"][0]["rule"].update(kappa_max=3.0), "kappa_max"),
    (lambda d: d["groups"][1].update(pattern="(unclosed"), "bad pattern"),
    (lambda d: d["groups"][1].pop("pattern"), "pattern"),
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.pop("schema_version"), "schema_version"),
    (lambda d: d.update(format="something.else"), "format"),
    (lambda d: d.pop("format"), "format"),
    (lambda d: d["default"].update(stable_rank_min="2"), "stable_rank_min"),
    (lambda d: d["default"].update(alpha_min=True), "alpha_min"),
    (lambda d: d.update(default=[1, 2]), "default"),
    (lambda d: d.update(provenance="me"), "provenance"),
])
def test_invalid_files_raise_one_line_errors(tmp_path, mutate, needle):
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ThresholdsError) as excinfo:
        load_thresholds(path)
    msg = _one_line_error(excinfo)
    assert needle in msg
    assert str(path) in msg  # says which file
    with pytest.raises(ThresholdsError):
        Thresholds.from_dict(data)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe", "[1, 2, 3]", "null"])
def test_non_json_or_non_object_raises(tmp_path, text):
    path = tmp_path / "bad.json"
    if text == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    with pytest.raises(ThresholdsError) as excinfo:
        load_thresholds(path)
    assert str(path) in _one_line_error(excinfo)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ThresholdsError) as excinfo:
        load_thresholds(tmp_path / "nope.json")
    assert "not found" in _one_line_error(excinfo)
    with pytest.raises(ThresholdsError):
        load_thresholds(tmp_path)  # a directory is not a thresholds file


def test_thresholds_error_is_a_value_error():
    assert issubclass(ThresholdsError, ValueError)


def test_null_and_integers_are_accepted(tmp_path):
    data = _valid()
    data["default"]["condition_number_max"] = None
    data["default"]["stable_rank_min"] = 3  # int -> float
    t = load_thresholds(_write(tmp_path, data))
    assert t.default.condition_number_max is None
    assert t.default.stable_rank_min == 3.0 and isinstance(t.default.stable_rank_min, float)


def test_a_file_without_the_row_floor_takes_the_shipped_value(tmp_path):
    # files written before row_stable_rank_min existed keep the shipped collapse law; an
    # explicit null still switches the row check off
    shipped = default_thresholds().default.row_stable_rank_min
    assert shipped is not None and shipped > 0
    data = default_thresholds().to_dict()
    del data["default"]["row_stable_rank_min"]
    old = load_thresholds(_write(tmp_path, data, "old.json"))
    assert old.default.row_stable_rank_min == shipped
    assert old.rule_for("model.layers.0.mlp.up_proj.weight").row_stable_rank_min == shipped
    assert old.default == default_thresholds().default
    data["default"]["row_stable_rank_min"] = None
    assert load_thresholds(_write(tmp_path, data, "off.json")).default.row_stable_rank_min is None
    data["default"]["row_stable_rank_min"] = 2.5
    assert load_thresholds(_write(tmp_path, data, "own.json")).default.row_stable_rank_min == 2.5
