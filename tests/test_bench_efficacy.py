"""bench/efficacy.py: the LR-sensitivity arithmetic, the benchmark-only fixes, and a ``--quick``
smoke run of the whole harness (runs, cache resume, doc and plots)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eff():
    spec = importlib.util.spec_from_file_location("bench_efficacy", ROOT / "bench" / "efficacy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_efficacy"] = module
    spec.loader.exec_module(module)
    return module


def _result(method: str, lr: float, seed: int, final: float, loss0: float = 5.5) -> dict:
    return {"method": method, "lr": lr, "seed": seed, "tag": "sweep", "loss0": loss0,
            "final": final, "wall": 1.0, "losses": [1.0], "spikes": 0, "interventions": 0.0,
            "probes": [{"step": 0, "min_entropy": 2.0, "max_logit": 1.0, "qk_scale": 0.1,
                        "min_erank_retention": 1.0}]}


def test_lr_sensitivity_is_wortsman_definition(eff) -> None:
    lrs = [1e-3, 1e-2, 1e-1]
    finals = {0: [3.0, 2.0, math.nan], 1: [3.2, 2.2, 6.0]}   # nan: diverged -> loss_0
    results = [_result("recipe", lr, s, f) for s, fs in finals.items()
               for lr, f in zip(lrs, fs, strict=True)]
    summary = eff.summarize(results, lrs, 1e-2, unigram=4.0)["recipe"]
    best = 2.0
    per_seed = [((3.0 + 2.0 + 5.5) / 3) - best, ((3.2 + 2.2 + 5.5) / 3) - best]
    assert summary["best"] == best
    assert summary["sensitivity"][0] == pytest.approx(sum(per_seed) / 2)
    assert summary["sensitivity"][1] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    assert summary["diverged"] == {1e-3: 0, 1e-2: 0, 1e-1: 1}
    # stable: every seed finite and <= best + (unigram - best) / 2 = 3.0
    assert summary["max_stable_lr"] == 1e-2


def test_spike_counts_maximal_runs(eff) -> None:
    losses = [2.0] * 30 + [3.0, 3.1] + [2.0] * 10 + [float("nan")]
    assert eff._spikes(losses, start=0) == 2


def test_sigma_reparam_has_spectral_norm_gamma(eff) -> None:
    torch.manual_seed(0)
    model = eff.GPT(eff.ModelConfig(n_layers=1, d=16, heads=2, seq=8, sigma_reparam=True))
    for lin in eff.block_linears(model).values():   # from the first forward on, not eventually
        W = lin.effective_weight().detach()
        assert float(torch.linalg.matrix_norm(W, 2)) == pytest.approx(1.0, rel=1e-4)
    lin = eff.SigmaReparamLinear(24, 16)
    for _ in range(200):
        lin(torch.randn(2, 24))
    assert float(torch.linalg.matrix_norm(lin.effective_weight().detach(), 2)) == pytest.approx(
        1.0, rel=1e-4)


def test_qk_clip_caps_the_observed_logit(eff) -> None:
    torch.manual_seed(0)
    model = eff.GPT(eff.ModelConfig(n_layers=1, d=16, heads=2, seq=8))
    att = model.blocks[0].attn
    with torch.no_grad():
        att.q_proj.weight.mul_(40)
        att.k_proj.weight.mul_(40)
    x = torch.randint(0, 256, (4, 8))
    model(x)
    assert float(att.max_logit.max()) > 5.0
    hits = eff._qk_clip(model, 5.0)
    assert hits >= 1
    model(x)
    assert float(att.max_logit.max()) <= 5.0 + 1e-3


@pytest.mark.timeout(240)
def test_quick_run_writes_doc_plots_and_resumes(eff, tmp_path, single_thread, capsys) -> None:
    args = ["--quick", "--jobs", "1", "--cache", str(tmp_path / "runs.jsonl"),
            "--doc", str(tmp_path / "efficacy.md"), "--img", str(tmp_path / "img")]
    summary = eff.main(args)
    assert set(summary) == set(eff.METHODS)
    for s in summary.values():
        assert math.isfinite(s["sensitivity"][0]) and s["sensitivity"][0] >= 0
    doc = (tmp_path / "efficacy.md").read_text()
    for method in eff.METHODS:
        assert f"| {method} |" in doc
    assert "LR sensitivity" in doc and "--quick" in doc
    for name in ("efficacy_quick_loss_vs_lr.png", "efficacy_quick_stress_curves.png",
                 "efficacy_quick_attention.png"):
        assert (tmp_path / "img" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"img/{name}" in doc
    capsys.readouterr()
    with (tmp_path / "efficacy.md").open("a") as fh:
        fh.write("hand-written interpretation\n")
    eff.main(args)   # every run cached: nothing trains again, the interpretation is kept
    assert "0 to do" in capsys.readouterr().out
    assert (tmp_path / "efficacy.md").read_text().endswith("hand-written interpretation\n")
