"""``spectral-guard audit`` end to end: exit codes, one-line errors, --json, --csv, --top."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from audit_fixtures import f32_entry, gaussian_matrices, raw_safetensors, write_sharded
from safetensors.torch import save_file
from spectral_guard.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["audit", *map(str, args)])


def assert_input_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err, err
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.fixture
def healthy(tmp_path) -> Path:
    p = tmp_path / "healthy.safetensors"
    save_file({**gaussian_matrices(), "norm.weight": torch.ones(8)}, str(p))
    return p


@pytest.fixture
def damaged(tmp_path) -> Path:
    t = gaussian_matrices()
    t["layers.2.nan.weight"] = torch.full((40, 40), math.nan)
    t["layers.2.low.weight"] = torch.randn(64, 1) @ torch.randn(1, 64)
    p = tmp_path / "damaged.safetensors"
    save_file(t, str(p))
    return p


def test_healthy_exit_0_with_table_and_verdict(healthy):
    r = run(healthy)
    assert r.exit_code == 0, r.output
    assert "layers.0.a.weight" in r.stdout and "HEALTHY" in r.stdout
    assert "1 tensor(s) skipped" in r.stdout


def test_findings_exit_1_worst_first(damaged):
    r = run(damaged)
    assert r.exit_code == 1
    out = r.stdout
    assert "FAIL" in out
    assert out.index("layers.2.nan.weight") < out.index("layers.2.low.weight") \
        < out.index("layers.0.a.weight")


def test_fail_on_policy_changes_exit_code(damaged):
    assert run(damaged, "--fail-on", "none").exit_code == 0
    assert run(damaged, "--fail-on", "nonfinite").exit_code == 1
    assert run(damaged, "--fail-on", "ill_conditioned,suspicious").exit_code == 0
    assert_input_error(run(damaged, "--fail-on", "bogus"), "unknown status 'bogus'")


def test_json_is_the_only_stdout(damaged):
    r = run(damaged, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)  # exactly one document, nothing else
    assert doc["schema_version"] == 1
    assert doc["verdict"]["exit_code"] == 1
    names = [m["name"] for m in doc["matrices"]]
    assert names[:2] == ["layers.2.nan.weight", "layers.2.low.weight"]

    def no_constants(name: str) -> None:
        raise AssertionError(f"JSON holds {name}")

    json.loads(r.stdout, parse_constant=no_constants)


def test_csv_top_quiet(damaged, tmp_path):
    out = tmp_path / "report.csv"
    r = run(damaged, "--csv", out, "--top", "2")
    assert r.exit_code == 1
    assert "worst 2 of 6" in r.stdout and "layers.0.a.weight" not in r.stdout
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 6 and rows[0]["name"] == "layers.2.nan.weight"
    assert rows[0]["stable_rank"] == "" and rows[0]["status"] == "nonfinite"
    q = run(damaged, "--quiet")
    assert q.exit_code == 1 and "┃" not in q.stdout and "FAIL" in q.stdout


def test_exact_mode_and_options(healthy):
    r = run(healthy, "--mode", "exact", "--seed", "3", "--limit", "16", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["summary"]["mode"] == "exact"
    assert all(m["measured_shape"] == m["shape"] for m in doc["matrices"])
    b = json.loads(run(healthy, "--limit", "16", "--json").stdout)
    assert all(max(m["measured_shape"]) <= 16 for m in b["matrices"])
    inc = json.loads(run(healthy, "--include", r"layers\.1", "--exclude", r"\.b\.",
                         "--json").stdout)
    assert [m["name"] for m in inc["matrices"]] == ["layers.1.a.weight"]


def test_sharded_folder_and_index(tmp_path):
    index = write_sharded(tmp_path / "ck", gaussian_matrices(), n_shards=2)
    for target in (index, tmp_path / "ck"):
        r = run(target, "--json")
        assert r.exit_code == 0
        assert len(json.loads(r.stdout)["matrices"]) == 4


def test_thresholds_option(healthy, tmp_path):
    th = tmp_path / "th.json"
    th.write_text(json.dumps({"format": "spectral_guard.thresholds", "schema_version": 1,
                              "default": {"effective_rank_ratio_min": 0.99}}))
    assert run(healthy, "--thresholds", th).exit_code == 1
    th.write_text("{broken")
    assert_input_error(run(healthy, "--thresholds", th), "not valid JSON")
    assert_input_error(run(healthy, "--thresholds", tmp_path / "none.json"), "not found")


# ---- bad input: one line on stderr, exit 2, no traceback ---------------------------------


def test_missing_file(tmp_path):
    assert_input_error(run(tmp_path / "missing.safetensors"), "no such file")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_input_error(run(tmp_path / "empty"), "no checkpoint found")


def test_truncated(tmp_path, healthy):
    p = tmp_path / "cut.safetensors"
    p.write_bytes(healthy.read_bytes()[:-10])
    assert_input_error(run(p), "truncated")


@pytest.mark.parametrize("header_len, needle", [(10**6, "larger than the file"),
                                                (10**8 + 1, "limit")])
def test_bad_header_length(tmp_path, header_len, needle):
    p = tmp_path / "h.safetensors"
    p.write_bytes(raw_safetensors({"a": f32_entry([1], 0)}, b"\0" * 4, header_len=header_len))
    assert_input_error(run(p), needle)


def test_malformed_json_header(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(raw_safetensors(b'{"a": [1, }'))
    assert_input_error(run(p), "malformed JSON header")


@pytest.mark.parametrize("offsets, needle", [([0, 8], "overlaps"), ([4, 8], "truncated"),
                                             ([8, 12], "gap")])
def test_bad_offsets(tmp_path, offsets, needle):
    p = tmp_path / "h.safetensors"
    header = {"a": f32_entry([1], 0), "b": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    if needle == "overlaps":
        header["b"]["shape"] = [2]
        data = b"\0" * 8
    elif needle == "truncated":
        data = b"\0" * 4
    else:
        data = b"\0" * 12
    p.write_bytes(raw_safetensors(header, data))
    assert_input_error(run(p), needle)


def test_unknown_dtype(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(raw_safetensors({"a": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 4]}},
                                  b"\0" * 4))
    assert_input_error(run(p), "unknown dtype 'Q4_K'")


def test_index_with_missing_shard_and_escaping_shard(tmp_path):
    index = write_sharded(tmp_path / "ck", gaussian_matrices(), n_shards=2)
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    assert_input_error(run(index), "does not exist")
    data["weight_map"][first] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    assert_input_error(run(index), "escapes the checkpoint folder")
    data["weight_map"][first] = "/etc/passwd"
    index.write_text(json.dumps(data))
    assert_input_error(run(index), "escapes the checkpoint folder")


def test_legacy_pickle_bin_not_supported(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(3, 3)}, p, _use_new_zipfile_serialization=False)
    assert_input_error(run(p), "legacy (non-zip)")


def test_no_matrices(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"b": torch.randn(3), "n": torch.arange(4)}, str(p))
    assert_input_error(run(p), "no matrices to audit")


def test_bad_option_values(healthy):
    assert_input_error(run(healthy, "--mode", "fast"), "--mode")
    assert_input_error(run(healthy, "--include", "("), "bad regular expression")
    assert_input_error(run(healthy, "--top", "0"), "--top")
    assert run().exit_code == 2  # Typer's own usage error: missing PATH


def test_nan_layer_is_a_finding_not_an_error(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.full((16, 16), math.nan)}, str(p))
    r = run(p)
    assert r.exit_code == 1 and "nonfinite" in r.stdout and r.stderr == ""


def test_console_script_subprocess(tmp_path, damaged):
    exe = shutil.which("spectral-guard", path=os.path.dirname(sys.executable)) \
        or shutil.which("spectral-guard")
    cmd = [exe] if exe else [sys.executable, "-m", "spectral_guard.cli.main"]
    bad = subprocess.run([*cmd, "audit", str(tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr and "no such file" in bad.stderr
    good = subprocess.run([*cmd, "audit", str(damaged), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert good.returncode == 1
    assert json.loads(good.stdout)["verdict"]["healthy"] is False
    assert "Traceback" not in good.stderr


def _code_table(text: str) -> dict[int, str]:
    """``{code: meaning}`` of a markdown table whose rows start ``| <int> |``."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1]
    return rows


def test_documented_exit_codes_match_the_cli():
    from spectral_guard.cli import common

    codes = {common.EXIT_OK, common.EXIT_FINDINGS, common.EXIT_USAGE, common.EXIT_INTERNAL,
             common.EXIT_INTERRUPTED}
    doc = (Path(__file__).resolve().parent.parent / "docs" / "audit.md").read_text()
    section = doc.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    table = _code_table(section)
    assert set(table) == codes == set(_code_table(common.__doc__))
    assert "internal" in table[common.EXIT_INTERNAL]
    assert "usage or input" in table[common.EXIT_USAGE]
    assert "interrupted" in table[common.EXIT_INTERRUPTED].lower()
    # the prose says the same code for internal errors
    assert f"internal error ends with one line and exit {common.EXIT_INTERNAL}" in \
        " ".join(section.split())


def test_internal_error_exits_3_with_one_line(healthy, monkeypatch):
    import spectral_guard.audit as audit_pkg

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(audit_pkg, "audit", broken)
    r = run(healthy)
    assert r.exit_code == 3, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "internal error" in err and "boom" in err


def test_option_errors_name_the_flag(healthy):
    assert_input_error(run(healthy, "--exclude", "[a"), "--exclude '[a'")
    r = run(healthy, "--limit", "1")
    assert r.exit_code == 2 and "--limit" in r.stderr
    r = run(healthy, "--heads", "0")
    assert r.exit_code == 2 and "--heads" in r.stderr
