"""``spectral-guard calibrate`` end to end: the file it writes is used by ``audit
--thresholds``; summary, --json, the random-weights refusal, and one-line input errors (the
self-audit refusal and ``--force``: tests/test_calibrate_law.py)."""

from __future__ import annotations

import json

import pytest
import torch
from calibrate_family import family  # noqa: F401  (session fixture)
from safetensors.torch import save_file
from spectral_guard.cli.main import app
from test_cli_conventions import one_line_error
from typer.testing import CliRunner

from spectral_guard.thresholds import SCHEMA_VERSION, load_thresholds

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, needle: str, code: int = 2) -> None:
    one_line_error(result, code, needle)


@pytest.fixture(scope="module")
def written(family, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cal") / "thresholds.json"
    result = cli("calibrate", *family.references, "--out", out)
    return result, out


def test_calibrate_writes_a_file_the_audit_uses(family, written):  # noqa: F811
    result, out = written
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("spectral-guard calibrate (biopsy, limit 128)", "attention", "mlp",
                     "heads", "global", "(P10 ", "(P90 ", "(shipped)", f"Wrote {out}",
                     "Self-audit: the file flags 0 of 45 reference matrices"):
        assert expected in text, expected
    assert result.stderr == ""  # small groups are normal: no warning
    th = load_thresholds(out)
    assert th.provenance["source"] == "spectral-guard calibrate"
    healthy = cli("audit", family.held_out, "--thresholds", out)
    assert healthy.exit_code == 0, healthy.output
    assert "HEALTHY" in healthy.stdout
    for damaged in family.damaged.values():
        assert cli("audit", damaged, "--thresholds", out, "--quiet").exit_code == 1


def test_json_is_one_document_with_every_group(family, tmp_path):  # noqa: F811
    out = tmp_path / "t.json"
    r = cli("calibrate", *family.references, "-o", out, "--json", "--mode", "exact")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["written"] is True and doc["out"] == str(out)
    assert set(doc["groups"]) == {"heads", "position_embeddings", "embeddings", "attention",
                                  "mlp", "other"}
    att = doc["groups"]["attention"]
    assert att["matrices"] == 24 and att["fallback"] is False
    learned = att["thresholds"]["stable_rank_min"]
    assert learned["percentile"] == 10 and learned["margin"] == 0.8
    assert learned["value"] == pytest.approx(min(learned["at_percentile"] * 0.8,
                                                 0.9 * learned["extreme"]), rel=1e-3)
    assert doc["groups"]["heads"]["fallback"] is True
    assert doc["thresholds"]["provenance"]["mode"] == "exact"
    assert doc["random_weights"]["looks_random"] is False
    assert doc["self_audit"]["matrices"] == 45 and doc["self_audit"]["names"] == []
    assert doc["thresholds"] == json.loads(out.read_text())
    json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))


def test_random_references_are_refused_unless_allowed(family, tmp_path):  # noqa: F811
    out = tmp_path / "t.json"
    r = cli("calibrate", family.random_init, "-o", out)
    assert r.exit_code == 1, r.output
    assert not out.exists()
    assert "randomly initialized" in r.stderr and "nothing written" in r.stderr
    assert "Nothing written" in r.stdout
    r = cli("calibrate", family.random_init, "-o", out, "--allow-random", "--json")
    assert r.exit_code == 0 and out.exists()
    doc = json.loads(r.stdout)
    assert doc["random_weights"]["looks_random"] and doc["written"]
    assert any("written anyway" in w for w in doc["warnings"])


def test_run_option_derives_guard_fields(family, tmp_path):  # noqa: F811
    out = tmp_path / "t.json"
    r = cli("calibrate", *family.run, "--run", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    th = load_thresholds(out)
    assert "derived from a run" in th.provenance["guard_fields"]
    assert th.rule_for("model.layers.0.mlp.up_proj.weight").effective_rank_retention_min \
        != 0.5


def test_percentile_options(family, tmp_path):  # noqa: F811
    out = tmp_path / "t.json"
    r = cli("calibrate", family.references[0], "-o", out, "--floor-percentile", "25",
            "--floor-margin", "0.5", "--min-group", "4", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["thresholds"]["provenance"]["rule"]["floor_percentile"] == 25
    assert doc["groups"]["mlp"]["fallback"] is False  # 4 matrices >= --min-group 4
    assert doc["global"]["thresholds"]["stable_rank_min"]["percentile"] == 25


def test_bad_inputs_one_line_exit_2(family, tmp_path):  # noqa: F811
    ref = family.references[0]
    out = tmp_path / "t.json"
    # empty reference set
    assert_one_line_error(cli("calibrate", "-o", out), "Missing argument 'REF...'")
    # references with no matrices
    vectors = tmp_path / "vectors.safetensors"
    save_file({"norm.weight": torch.ones(8)}, str(vectors))
    assert_one_line_error(cli("calibrate", vectors, "-o", out), "no matrices to audit")
    assert_one_line_error(cli("calibrate", tmp_path / "missing.safetensors", "-o", out),
                          "no such file")
    # non-writable --out: checked before anything is read (the missing reference is not
    # reported: the --out check comes first)
    assert_one_line_error(cli("calibrate", tmp_path / "missing.safetensors", "-o", tmp_path),
                          "is a directory")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_one_line_error(cli("calibrate", ref, "-o", blocker / "t.json"), "cannot write")
    assert not out.exists()
    # options
    assert_one_line_error(cli("calibrate", ref, "-o", out, "--floor-percentile", "150"),
                          "--floor-percentile must be in [0, 100]")
    assert_one_line_error(cli("calibrate", ref, "-o", out, "--ceiling-margin", "-1"),
                          "--ceiling-margin must be a positive number")
    assert_one_line_error(cli("calibrate", ref, "-o", out, "--run"),
                          "--run needs at least two references")
    assert_one_line_error(cli("calibrate", ref, "-o", out, "--reference-margin", "1.5"),
                          "--reference-margin must be in (0, 1]")
    assert_one_line_error(cli("calibrate", ref, "-o", out, "--mode", "fast"), "--mode")
    assert_one_line_error(cli("calibrate", ref, "-o", out, "--json", "--quiet"), "--json")


def test_corrupt_and_newer_thresholds_files(written, family, tmp_path):  # noqa: F811
    _result, out = written
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(out.read_text()[:200])
    assert_one_line_error(cli("audit", family.held_out, "--thresholds", corrupt),
                          "not valid JSON")
    doc = json.loads(out.read_text())
    doc["schema_version"] = SCHEMA_VERSION + 1
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc))
    assert_one_line_error(cli("audit", family.held_out, "--thresholds", newer),
                          f"schema_version {SCHEMA_VERSION + 1} is newer")
