"""CLI conventions shared by every command: exit codes 0/1/2/3/130, one-line errors (usage
errors included), Ctrl-C, internal errors behind --debug, output paths checked before work,
enum choices in --help, --top/--quiet against --json, and a clean first screen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from spectral_guard.cli import audit as audit_cli
from spectral_guard.cli.common import EXIT_INTERNAL, EXIT_INTERRUPTED
from spectral_guard.cli.main import app
from typer.testing import CliRunner

import spectral_guard.audit
import spectral_guard.calibration
from spectral_guard.verdict import STATUSES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_model.safetensors"
runner = CliRunner()


def cli(*args, **env):
    return runner.invoke(app, [str(a) for a in args], env=env or None)


def one_line_error(result, code: int, needle: str) -> str:
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err, err
    assert "╭" not in result.output and "Traceback" not in result.output
    assert result.stdout == ""
    return err


@pytest.mark.parametrize("args,needle", [
    (["audit", EXAMPLE, "--bogus"], "No such option: --bogus"),
    (["audit", EXAMPLE, "--mode", "fast"], "'fast' is not one of 'biopsy', 'exact'"),
    (["audit", EXAMPLE, "--limit", "many"], "Invalid value for '--limit'"),
    (["audit", EXAMPLE, "--fail-on", "collapsed,bogus"], "unknown status 'bogus'"),
    (["audit"], "Missing argument 'PATH...'"),
    (["calibrate", EXAMPLE], "Missing option '--out'"),
    (["calibrate", EXAMPLE, "-o", "x.json", "--mode", "fast"], "is not one of"),
    (["definitely-not-a-command"], "No such command"),
])
def test_usage_errors_are_one_line_exit_2(args, needle):
    err = one_line_error(cli(*args), 2, needle)
    if args[0] in ("audit", "calibrate"):
        assert f"(see 'spectral-guard {args[0]} --help')" in err


def test_fail_on_accepts_lists_and_none(tmp_path):
    assert cli("audit", ROOT / "examples" / "tiny_model_damaged.safetensors", "--fail-on",
               "none", "--quiet").exit_code == 0
    assert cli("audit", ROOT / "examples" / "tiny_model_damaged.safetensors", "--fail-on",
               "suspicious, nonfinite", "--quiet").exit_code == 1
    assert audit_cli.STATUS_CHOICES == STATUSES  # --help needs no torch import


def test_help_lists_choices_and_exit_codes():
    top = cli("--help")
    assert top.exit_code == 0
    assert "calibrate" in top.stdout and "audit" in top.stdout
    flat = " ".join(top.stdout.split())
    assert "130 interrupted" in flat and "3 internal error" in flat
    for command in ("audit", "calibrate"):
        r = cli(command, "--help")
        assert r.exit_code == 0
        flat = " ".join(r.stdout.replace("│", " ").split())
        assert "biopsy|exact" in flat
        assert "Exit codes: 0" in flat and "130 interrupted" in flat and "--debug" in flat
    wide = cli("audit", "--help", COLUMNS="200").stdout
    assert ("[nonfinite|dead_units|collapsed|ill_conditioned|logit_risk|suspicious|ok|none],..."
            in wide)


@pytest.mark.parametrize("command", ["audit", "calibrate"])
def test_ctrl_c_exits_130_with_one_line(command, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = spectral_guard.audit if command == "audit" else spectral_guard.calibration
    monkeypatch.setattr(target, command if command == "calibrate" else "audit", interrupted)
    extra = ["-o", tmp_path / "t.json"] if command == "calibrate" else []
    one_line_error(cli(command, EXAMPLE, *extra), EXIT_INTERRUPTED, "interrupted")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("command", ["audit", "calibrate"])
def test_internal_error_exit_3_traceback_only_with_debug(command, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    target = spectral_guard.audit if command == "audit" else spectral_guard.calibration
    monkeypatch.setattr(target, command if command == "calibrate" else "audit", broken)
    extra = ["-o", tmp_path / "t.json"] if command == "calibrate" else []
    err = one_line_error(cli(command, EXAMPLE, *extra), EXIT_INTERNAL, "internal error")
    assert "RuntimeError: boom" in err and "--debug" in err
    debug = cli(command, EXAMPLE, *extra, "--debug")
    assert debug.exit_code == EXIT_INTERNAL
    assert "Traceback" in debug.stderr and "RuntimeError: boom" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: internal error")
    env = cli(command, EXAMPLE, *extra, SPECTRAL_GUARD_DEBUG="1")
    assert env.exit_code == EXIT_INTERNAL and "Traceback" in env.stderr


def test_csv_path_is_checked_before_the_audit_starts(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(spectral_guard.audit, "audit", lambda *a, **k: calls.append(a))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    one_line_error(cli("audit", EXAMPLE, "--csv", blocker / "r.csv"), 2, "--csv")
    one_line_error(cli("audit", EXAMPLE, "--csv", tmp_path), 2, "is a directory")
    one_line_error(cli("audit", EXAMPLE, "--csv", tmp_path / "no" / "r.csv"), 2,
                   "No such file or directory")
    assert calls == []  # refused before any reading
    assert not (tmp_path / "no").exists()


def test_csv_check_leaves_no_file_behind_on_input_errors(tmp_path):
    csv_path = tmp_path / "r.csv"
    one_line_error(cli("audit", tmp_path / "missing.safetensors", "--csv", csv_path), 2,
                   "no such file")
    assert not csv_path.exists()
    existing = tmp_path / "old.csv"
    existing.write_text("keep me")
    cli("audit", tmp_path / "missing.safetensors", "--csv", existing)
    assert existing.read_text() == "keep me"  # checked by appending nothing, not truncated


@pytest.mark.parametrize("flags", [["--top", "3"], ["--quiet"]])
def test_top_and_quiet_refused_with_json(flags):
    one_line_error(cli("audit", EXAMPLE, "--json", *flags), 2, "cannot be combined with --json")


def _python(code: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def test_first_screen_is_clean_without_numpy():
    # torch prints "UserWarning: Failed to initialize NumPy" at import when numpy is missing
    code = ("import sys; sys.modules['numpy'] = None\n"
            "sys.argv = ['spectral-guard', 'audit', 'examples/tiny_model.safetensors']\n"
            "from spectral_guard.cli.main import main; main()")
    proc = _python(code)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "HEALTHY" in out
    assert err == "", err


def test_real_ctrl_c_in_a_real_process():
    code = ("import sys, time\n"
            "import spectral_guard.audit as a\n"
            "def slow(*args, **kwargs):\n"
            "    print('started', file=sys.stderr, flush=True); time.sleep(60)\n"
            "a.audit = slow\n"
            "sys.argv = ['spectral-guard', 'audit', 'examples/tiny_model.safetensors']\n"
            "from spectral_guard.cli.main import main; main()")
    proc = _python(code)
    assert proc.stderr.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert err.strip().splitlines() == ["error: interrupted (Ctrl-C); nothing was written"]
    assert out == ""
