"""The audit's attention-logit pass: exact per-head q-k scale, pairing, ``logit_risk``, CLI."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from spectral_guard.cli.main import app
from typer.testing import CliRunner

from spectral_guard.audit import audit
from spectral_guard.audit.logit import candidate_pairs, exact_head_scales, typical_head_scales
from spectral_guard.audit.plan import FUSED_READ_AS
from spectral_guard.thresholds import Rule, Thresholds, load_thresholds

transformers = pytest.importorskip("transformers")

runner = CliRunner()


def explicit_products(Wq: torch.Tensor, Wk: torch.Tensor, heads: int, kv: int
                      ) -> list[np.ndarray]:
    """The explicit ``n x n`` products ``W_q,h^T W_k,h / sqrt(d_h)`` in numpy float64
    (``Wq``: ``heads*d_h x n``, ``Wk``: ``kv*d_h x n``)."""
    q = Wq.detach().double().numpy()
    k = Wk.detach().double().numpy()
    d_h = q.shape[0] // heads
    out = []
    for h in range(heads):
        j = h // (heads // kv)
        out.append(q[h * d_h:(h + 1) * d_h].T @ k[j * d_h:(j + 1) * d_h] / math.sqrt(d_h))
    return out


def explicit_bounds(Wq: torch.Tensor, Wk: torch.Tensor, heads: int, kv: int) -> list[float]:
    """``sigma_max(W_q,h^T W_k,h) / sqrt(d_h) * n`` per head (numpy SVD of the product)."""
    return [float(np.linalg.svd(M, compute_uv=False)[0]) * M.shape[0]
            for M in explicit_products(Wq, Wk, heads, kv)]


def explicit_typical(Wq: torch.Tensor, Wk: torch.Tensor, heads: int, kv: int) -> list[float]:
    """``||W_q,h^T W_k,h||_F / sqrt(d_h)`` per head (numpy Frobenius norm of the product)."""
    return [float(np.linalg.norm(M)) for M in explicit_products(Wq, Wk, heads, kv)]


@pytest.mark.parametrize("d_h,n", [(4, 32), (8, 8), (16, 6)])
def test_head_scales_match_the_explicit_product(d_h: int, n: int) -> None:
    # both scales against numpy on the explicit n x n product: its largest singular value
    # (worst case, through QR when d_h < n) and its Frobenius norm (typical, through Grams)
    g = torch.Generator().manual_seed(d_h * 100 + n)
    Wq = torch.randn(3, d_h, n, generator=g, dtype=torch.float64)
    Wk = torch.randn(3, d_h, n, generator=g, dtype=torch.float64) * 5
    flat = (Wq.reshape(-1, n), Wk.reshape(-1, n), 3, 3)
    for fn, ref in ((exact_head_scales, [b / n for b in explicit_bounds(*flat)]),
                    (typical_head_scales, explicit_typical(*flat))):
        got = fn(Wq, Wk)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
        # float32 input: computed in float64
        got32 = fn(Wq.float(), Wk.float())
        assert got32.dtype == torch.float64
        torch.testing.assert_close(got32, got, rtol=1e-5, atol=0)


def test_typical_scale_is_the_rms_logit_of_isotropic_inputs() -> None:
    # what the statistic means: x, y independent with E[x x^T] = I (unit RMS) give logits
    # x^T W_q^T W_k y / sqrt(d_h) whose RMS is tau; Monte Carlo with 200k pairs
    g = torch.Generator().manual_seed(0)
    d_h, n = 8, 48
    Wq = torch.randn(1, d_h, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    Wk = torch.randn(1, d_h, n, generator=g, dtype=torch.float64) * 4 / math.sqrt(n)
    x = torch.randn(200_000, n, generator=g, dtype=torch.float64)
    y = torch.randn(200_000, n, generator=g, dtype=torch.float64)
    logits = ((x @ Wq[0].T) * (y @ Wk[0].T)).sum(1) / math.sqrt(d_h)
    rms = float(logits.pow(2).mean().sqrt())
    assert rms == pytest.approx(float(typical_head_scales(Wq, Wk)[0]), rel=0.02)
    # the worst case is far above the typical logit (here by more than 10x)
    assert float(exact_head_scales(Wq, Wk)[0]) * n > 10 * rms


def _llama(tmp_path: Path, scale: float = 1.0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    if scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(scale)
                layer.self_attn.k_proj.weight.mul_(scale)
    folder = tmp_path / ("llama" if scale == 1.0 else f"llama_x{scale:g}")
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return folder, model


@pytest.fixture
def llama(tmp_path) -> tuple[Path, torch.nn.Module]:
    return _llama(tmp_path)


def _by_name(report) -> dict:
    return {m.name: m for m in report.matrices}


def test_pairs_llama_checkpoint_gqa(llama) -> None:
    folder, model = llama
    rep = audit(folder, mode="exact")
    assert rep.logit_pairs == 2 and rep.logit_notes == []
    res = _by_name(rep)
    for i, layer in enumerate(model.model.layers):
        Wq, Wk = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        ref = explicit_bounds(Wq, Wk, 6, 2)
        typ = explicit_typical(Wq, Wk, 6, 2)
        for proj in ("q_proj", "k_proj"):
            m = res[f"model.layers.{i}.self_attn.{proj}.weight"]
            assert m.logit_pair == f"model.layers.{i}.self_attn"
            np.testing.assert_allclose(m.logit_head_scales, ref, rtol=1e-6)
            assert m.logit_scale == pytest.approx(max(ref), rel=1e-6)
            np.testing.assert_allclose(m.logit_head_typical, typ, rtol=1e-6)
            assert m.logit_typical == pytest.approx(max(typ), rel=1e-6)
            assert m.logit_head == int(np.argmax(ref))
            assert m.logit_typical_head == int(np.argmax(typ))
        assert res[f"model.layers.{i}.self_attn.v_proj.weight"].logit_scale is None
    # the live model (module attributes) gives the same values
    live = _by_name(audit(model, mode="exact"))
    paired = [name for name, m in res.items() if m.logit_scale is not None]
    assert len(paired) == 4
    for name in paired:
        assert live[name].logit_scale == pytest.approx(res[name].logit_scale, rel=1e-6)
        assert live[name].logit_typical == pytest.approx(res[name].logit_typical, rel=1e-6)


def test_pairs_gpt2_fused_conv1d(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    res = _by_name(audit(tmp_path))
    for i, block in enumerate(model.transformer.h):
        W = block.attn.c_attn.weight.T  # Conv1D stores in x out
        ref = explicit_bounds(W[:32], W[32:64], 4, 4)
        name = f"transformer.h.{i}.attn.c_attn.weight"
        for block_name in (f"{name}[q]", f"{name}[k]"):  # the pair's values on both blocks
            np.testing.assert_allclose(res[block_name].logit_head_scales, ref, rtol=1e-6)
            assert res[block_name].logit_pair == name.removesuffix(".weight")
        assert res[f"{name}[v]"].logit_scale is None


def test_candidate_pairs_patterns() -> None:
    shapes = {"a.q_proj.weight": (8, 8), "a.k_proj.weight": (4, 8), "a.v_proj.weight": (4, 8),
              "b.attn.c_attn.weight": (8, 24), "c.in_proj_weight": (24, 8),
              "d.query_key_value.weight": (24, 8), "e.q_proj.weight": (8, 8)}
    got = {(c[0], c[3]) for c in candidate_pairs(shapes)}
    assert got == {("a", "separate"), ("b.attn.c_attn", "contiguous"), ("c", "mha"),
                   ("d.query_key_value", "interleaved")}


def test_logit_risk_fires_on_scaled_qk_not_on_healthy(tmp_path) -> None:
    rule = load_thresholds(None).rule_for("model.layers.0.self_attn.q_proj.weight")
    assert rule.logit_typical_max is not None
    assert rule.logit_scale_max is None  # the worst-case bound grows with n: no shipped ceiling
    healthy = audit(_llama(tmp_path)[0])
    assert all(m.status != "logit_risk" for m in healthy.matrices)
    assert 0 < max(m.logit_typical or 0 for m in healthy.matrices) < rule.logit_typical_max
    # q and k scaled by 60: every product by 3600
    stressed = audit(_llama(tmp_path, scale=60.0)[0])
    risky = {m.name for m in stressed.matrices if m.status == "logit_risk"}
    assert risky == {f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1)
                     for p in ("q_proj", "k_proj")}
    m = _by_name(stressed)["model.layers.0.self_attn.q_proj.weight"]
    assert m.reasons and m.reasons[0].startswith("typical q-k logit")
    h = _by_name(healthy)["model.layers.0.self_attn.q_proj.weight"]
    assert m.logit_typical == pytest.approx(3600 * h.logit_typical, rel=1e-6)
    # not in the default policy
    assert stressed.exit_code == 0
    assert stressed.status_counts()["logit_risk"] == 4
    assert audit(_llama(tmp_path, scale=60.0)[0], fail_on=("logit_risk",)).exit_code == 1


def test_worst_case_ceiling_only_when_a_thresholds_file_sets_one(llama) -> None:
    folder, _ = llama
    base = audit(folder)
    bound = max(m.logit_scale for m in base.matrices if m.logit_scale is not None)
    assert all(m.status != "logit_risk" for m in base.matrices)
    ceiling = Thresholds(Rule(logit_scale_max=bound * 0.99), (), {})
    capped = audit(folder, thresholds=ceiling)
    flagged = [m for m in capped.matrices if m.status == "logit_risk"]
    assert len(flagged) == 2  # the q and k of the pair that reaches the bound
    assert flagged[0].reasons[0].startswith("q-k logit bound")


def test_skip_note_without_head_count(llama) -> None:
    folder, _ = llama
    (folder / "config.json").unlink()
    rep = audit(folder)
    assert rep.logit_pairs == 0
    assert all(m.logit_scale is None for m in rep.matrices)
    assert any("no head count" in n for n in rep.notes)
    assert "no head count" in rep.verdict_text()
    assert rep.to_json_dict()["summary"]["logit_notes"] == rep.logit_notes
    with_heads = audit(folder, heads=6)
    assert with_heads.logit_pairs == 2 and with_heads.logit_notes == []
    wrong = audit(folder, heads=5)  # 48 query rows do not split into 5 heads
    assert wrong.logit_pairs == 0 and "not measured" in wrong.logit_notes[0]
    assert "5 heads from the given head count" in wrong.logit_notes[0]
    assert rep.logit_needs_heads and not wrong.logit_needs_heads
    # library messages do not name command-line flags
    assert not any("--" in n or "heads=" in n for n in rep.logit_notes + wrong.logit_notes)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="head count must be a positive integer") as err:
            audit(folder, heads=bad)
        assert "--" not in str(err.value)


def test_nonfinite_key_weight_is_noted_not_silently_dropped(tmp_path) -> None:
    folder, _ = _llama(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    rep = audit(folder)
    assert rep.logit_pairs == 1
    note = next(n for n in rep.logit_notes if "NaN/Inf" in n)
    assert "model.layers.1.self_attn" in note
    res = _by_name(rep)
    assert res["model.layers.1.self_attn.k_proj.weight"].status == "nonfinite"
    assert res["model.layers.1.self_attn.q_proj.weight"].logit_scale is None
    assert res["model.layers.0.self_attn.q_proj.weight"].logit_scale is not None
    # the same from a live model
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    live = audit(model)
    assert live.logit_pairs == 1 and any("NaN/Inf" in n for n in live.logit_notes)


def test_state_dict_needs_heads(llama) -> None:
    _, model = llama
    sd = model.state_dict()
    assert audit(sd).logit_pairs == 0
    assert audit(sd, heads=6).logit_pairs == 2


def test_cli(tmp_path) -> None:
    folder = _llama(tmp_path, scale=60.0)[0]
    csv_path = tmp_path / "out.csv"
    r = runner.invoke(app, ["audit", str(folder), "--json", "--csv", str(csv_path)])
    assert r.exit_code == 0, r.output  # logit_risk is not in the default --fail-on
    doc = json.loads(r.stdout)
    assert doc["summary"]["status_counts"]["logit_risk"] == 4
    assert doc["summary"]["logit_pairs"] == 2
    q = next(m for m in doc["matrices"] if m["name"].endswith("0.self_attn.q_proj.weight"))
    assert q["status"] == "logit_risk" and q["logit_scale"] > 0
    assert len(q["logit_head_scales"]) == 6
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert {"logit_scale", "logit_head", "logit_pair"} <= set(rows[0])
    r = runner.invoke(app, ["audit", str(folder), "--fail-on", "logit_risk", "--no-progress"])
    assert r.exit_code == 1, r.output
    assert "qk logit" in r.stdout
    (folder / "config.json").unlink()
    r = runner.invoke(app, ["audit", str(folder), "--no-progress"])
    out = r.stdout.replace("\n", " ")
    assert r.exit_code == 0 and "no head count" in out and "--heads N" in out
    r = runner.invoke(app, ["audit", str(folder), "--heads", "6", "--fail-on", "logit_risk",
                            "--no-progress"])
    assert r.exit_code == 1, r.output
    r = runner.invoke(app, ["audit", str(folder), "--heads", "0"])
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "--heads" in err and "Traceback" not in r.output


TRAINED = Path(__file__).resolve().parent / "data" / "trained"


@pytest.mark.parametrize("name", ["gpt2_tiny", "llama_tiny"])
@pytest.mark.parametrize("mode", ["biopsy", "exact"])
def test_trained_decoders_attention_is_ok(name: str, mode: str) -> None:
    # causal LMs trained here (bench/train_corpus_decoders.py --tiny): every attention and MLP
    # matrix ok with the shipped defaults, the q-k pass included, far below the typical-logit
    # limit (their embeddings and output head are the embeddings group's business)
    folder = TRAINED / name
    rep = audit(folder, mode=mode)
    assert rep.logit_pairs == 2 and rep.logit_notes == []
    hidden = [m for m in rep.matrices
              if m.read_as in ("linear", *FUSED_READ_AS) and "lm_head" not in m.name]
    assert len(hidden) == {"gpt2_tiny": 12, "llama_tiny": 14}[name]  # 6 or 7 per layer
    assert {m.name: m.reasons for m in hidden if m.status != "ok"} == {}
    assert rep.status_counts()["logit_risk"] == 0
    limit = load_thresholds(None).default.logit_typical_max
    paired = [m for m in rep.matrices if m.logit_typical is not None]
    assert len(paired) == 4  # c_attn[q] + c_attn[k], or q_proj + k_proj
    assert max(m.logit_typical for m in paired) < limit / 8
