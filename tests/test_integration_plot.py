"""Plots: ``audit --plot``, ``esd`` (numbers, exit codes, ``--plot``), ``guard.plot``."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import reference
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from test_integration_extras import doc_example, require, trained_guard
from typer.testing import CliRunner

require("matplotlib")
from matplotlib.image import imread  # noqa: E402
from spectral_guard.cli.main import app  # noqa: E402

import spectral_guard  # noqa: E402
from spectral_guard import sensors  # noqa: E402
from spectral_guard.integrations.plot import (  # noqa: E402
    esd_density,
    fit_esd,
    plot_audit,
    plot_guard_history,
)

ROOT = Path(__file__).resolve().parents[1]
HEALTHY = ROOT / "examples" / "tiny_model.safetensors"
DAMAGED = ROOT / "examples" / "tiny_model_damaged.safetensors"
UP = "model.layers.0.mlp.up_proj.weight"


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_image(path: Path, min_width: int = 600) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[1] >= min_width and pixels.shape[0] >= 300
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_audit_plot_keeps_exit_code_and_json(tmp_path):
    out = tmp_path / "audit.png"
    result = run("audit", DAMAGED, "--json", "--plot", out)
    assert result.exit_code == 1, result.output  # findings, as without --plot
    report = json.loads(result.stdout)  # stdout is still one JSON document
    assert report["verdict"]["exit_code"] == 1
    assert_image(out)


def test_audit_plot_unwritable_path_is_a_one_line_usage_error(tmp_path):
    result = run("audit", HEALTHY, "--plot", tmp_path / "no" / "such" / "dir.png")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--plot" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["audit", HEALTHY], ["esd", HEALTHY, UP]])
def test_plot_unknown_format_is_refused_before_any_work(tmp_path, command):
    result = run(*command, "--plot", tmp_path / "figure.xyz")
    assert result.exit_code == 2 and result.stdout == ""
    assert "unknown image format '.xyz'" in result.stderr and ".png" in result.stderr
    assert result.stderr.count("\n") == 1


def test_audit_plot_depth_order_and_roles(tmp_path):
    from spectral_guard.integrations.plot import _depth_key, _role

    names = ["lm_head.weight", "model.layers.10.mlp.up_proj.weight",
             "model.layers.9.self_attn.q_proj.weight", "model.embed_tokens.weight",
             "model.layers.2.mlp.down_proj.weight"]
    ordered = sorted(names, key=_depth_key)
    assert ordered == ["model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight",
                       "model.layers.9.self_attn.q_proj.weight",
                       "model.layers.10.mlp.up_proj.weight", "lm_head.weight"]
    assert [_role(n) for n in ordered] == ["embeddings", "mlp", "attention", "mlp", "heads"]
    report = spectral_guard.audit(DAMAGED)
    assert_image(plot_audit(report, tmp_path / "a.png"))


def test_fit_esd_is_the_audit_alpha_rule():
    g = torch.Generator().manual_seed(0)
    k = 96
    s = ((1.0 - torch.rand(k, generator=g, dtype=torch.float64)) ** (-1.0 / 2.0)).sqrt()
    U, _ = torch.linalg.qr(torch.randn(160, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    W = ((U * s) @ V.T).float()
    fit = fit_esd(W)
    assert fit.alpha == pytest.approx(sensors.alpha_csn(W), rel=1e-9)
    ev = fit.eigenvalues
    assert ev.numel() == k and bool((ev[1:] >= ev[:-1]).all())
    # the independent numpy loop (tests/reference.py) picks the same xmin and tail
    ref_alpha, ref_xmin, _d, ref_tail = reference.powerlaw_fit(ev.numpy(), thresh=0.0)
    assert fit.xmin == pytest.approx(ref_xmin, rel=1e-12)
    assert fit.alpha == pytest.approx(ref_alpha, rel=1e-9)
    assert fit.n_tail == ref_tail == int((ev >= fit.xmin).sum())
    assert 2.0 < fit.alpha < 4.5  # a Pareto ESD with exponent 3, 48 tail samples
    # the drawn density integrates to 1 over log-spaced bins, and its mass above xmin is the
    # fitted tail's share
    edges, density = esd_density(fit)
    widths = edges[1:] - edges[:-1]
    assert float((density * widths).sum()) == pytest.approx(1.0, rel=1e-9)
    assert bool((edges[1:] > edges[:-1]).all())
    assert math.isclose(float(edges[0]), float(ev[0])) and math.isclose(float(edges[-1]),
                                                                       float(ev[-1]))


def test_fit_esd_drops_numerically_zero_eigenvalues_and_refuses_nonfinite():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)  # rank 3
    assert fit_esd(W).eigenvalues.numel() == 3
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fit_esd(W)


def test_esd_command_numbers_exit_codes_and_plot(tmp_path):
    out = tmp_path / "esd.png"
    result = run("esd", HEALTHY, UP, "--json", "--plot", out)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    W = load_file(HEALTHY)[UP]
    assert data["shape"] == list(W.shape) and data["dtype"] == "F16"
    assert data["alpha"] == pytest.approx(sensors.alpha_csn(W), rel=1e-9)
    assert data["n_tail"] <= data["eigenvalues"] == min(W.shape)
    assert data["plot"] == str(out)
    assert_image(out)
    text = run("esd", HEALTHY, UP)
    assert text.exit_code == 0 and f"alpha={data['alpha']:.3f}" in text.stdout

    nonfinite = run("esd", DAMAGED, "model.layers.0.self_attn.v_proj.weight", "--plot",
                    tmp_path / "nf.png")
    assert nonfinite.exit_code == 1 and "non-finite" in nonfinite.stdout
    assert not (tmp_path / "nf.png").exists()


@pytest.mark.parametrize("args, message", [
    (["model.layers.0.mlp.up_proj"], "did you mean model.layers.0.mlp.up_proj.weight"),
    (["model.layers.0.input_layernorm.weight"], "not a matrix"),
])
def test_esd_bad_names_are_one_line_errors(args, message):
    result = run("esd", HEALTHY, *args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_esd_stacked_experts_and_conv_kernels(tmp_path):
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "moe.safetensors"
    save_file({"experts.w": torch.randn(3, 24, 16, generator=g),
               "conv.weight": torch.randn(8, 4, 3, 3, generator=g)}, path)
    stack = run("esd", path, "experts.w")
    assert stack.exit_code == 2 and "experts.w[0]" in stack.stderr
    one = run("esd", path, "experts.w[2]", "--json")
    assert one.exit_code == 0, one.output
    expected = sensors.alpha_csn(load_file(path)["experts.w"][2])
    assert json.loads(one.stdout)["alpha"] == pytest.approx(expected, rel=1e-9)
    conv = run("esd", path, "conv.weight", "--json")
    assert conv.exit_code == 0 and json.loads(conv.stdout)["shape"] == [8, 36]


def test_guard_plot_draws_the_history(tmp_path, single_thread):
    guard = trained_guard(6)
    assert len(guard.history) > 0 and any(r["triggered"] for r in guard.history)
    out = tmp_path / "history.png"
    guard.plot(out)
    assert_image(out)
    assert_image(plot_guard_history(guard, tmp_path / "direct.png"))
    svg = tmp_path / "history.svg"
    guard.plot(svg)
    assert svg.read_text().lstrip().startswith("<?xml")


def test_guard_plot_without_history_is_a_clear_error(tmp_path):
    guard = spectral_guard.instrument(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="history is empty"):
        guard.plot(tmp_path / "x.png")


def test_docs_plot_commands_run_as_written(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "integrations.md").read_text()
    block = re.search(r"## Plots.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["spectral-guard", "audit"], ["spectral-guard", "esd"]]
    monkeypatch.chdir(ROOT)
    for cmd in commands:
        cmd = [str(tmp_path / a) if a.endswith(".png") else a for a in cmd[1:]]
        result = run(*cmd)
        assert result.exit_code in (0, 1), result.output  # the damaged model fails the audit
        assert_image(Path(cmd[-1]))


def test_docs_guard_plot_example_runs_as_written(tmp_path, monkeypatch, single_thread):
    monkeypatch.chdir(tmp_path)
    guard = trained_guard(3)
    exec(compile(doc_example("guard-plot"), "docs/integrations.md", "exec"), {"guard": guard})
    assert_image(tmp_path / "guard_history.png")


def test_docs_images_exist_and_are_referenced():
    text = (ROOT / "docs" / "integrations.md").read_text()
    for name in ("audit.png", "esd.png", "guard_history.png"):
        assert f"(img/{name})" in text
        assert_image(ROOT / "docs" / "img" / name)
