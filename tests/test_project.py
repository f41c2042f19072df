"""Project wiring: the CI script runs the README's test command, the console script works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from spectral_guard.cli.main import app
from typer.testing import CliRunner

import spectral_guard

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


def test_readme_test_command_is_what_ci_runs():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    commands = [line.strip() for line in blocks[1].splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[0] in ci_lines  # verbatim, as one whole line
    assert "pytest" in commands[0] and "ruff check" in commands[0]


def test_version_matches_package_metadata():
    from importlib.metadata import version

    assert spectral_guard.__version__ == version("spectral-guard")
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"spectral-guard {spectral_guard.__version__}"


def _registered_commands() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(getattr(group, "commands", {}))


def test_help_of_the_app_and_of_every_registered_command():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
    assert "--version" in result.output
    for name in _registered_commands():
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage" in sub.output and name in sub.output
        assert name in result.output  # listed in the top-level help


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(app, ["definitely-not-a-command"])
    assert result.exit_code == 2


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("spectral-guard")
    if script.exists():
        return [str(script)]
    found = shutil.which("spectral-guard")
    return [found] if found else [sys.executable, "-m", "spectral_guard.cli.main"]


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_console_script_in_a_real_process(args):
    proc = subprocess.run([*_console_script(), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    if args == ["--version"]:
        assert proc.stdout.strip() == f"spectral-guard {spectral_guard.__version__}"
    else:
        assert "Usage" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_module_entry_point_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "spectral_guard.cli.main", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert spectral_guard.__version__ in proc.stdout


def test_sensor_benchmark_quick_run():
    # smoke test of bench/sensors.py: it runs, prints every path, and its errors are numbers
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sensors.py"), "--quick",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for path in ("exact svdvals", "biopsy 128", "biopsy 128 keep_aspect", "power warm 1 step",
                 "power cold 8 steps", "sigma_min power 50 steps", "8 biopsies: loop",
                 "8 biopsies: batched"):
        assert path in proc.stdout, path
    assert "total wall time" in proc.stdout
    warm = [line for line in proc.stdout.splitlines() if "power warm 1 step" in line]
    assert len(warm) == 4  # three Gaussian shapes and the trained-like matrix
    for line in warm:
        sigma_err = float(line.split()[-4])
        assert 0.0 <= sigma_err < 1e-2
