"""audit.py: streamed metrics vs an independent float64 SVD, hygiene counts, tensor rules,
JSON contract, and healthy-vs-damaged trained models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import reference
import torch
from audit_fixtures import gaussian_matrices, tiny_models, write_sharded
from safetensors.torch import save_file

import spectral_guard
import spectral_guard.audit as audit_mod
import spectral_guard.audit.measure as measure_mod
from spectral_guard.audit import audit
from spectral_guard.checkpoint import CheckpointError
from spectral_guard.estimators import biopsy_indices, name_seed, spectral_metrics
from spectral_guard.thresholds import Rule, Thresholds, ThresholdsError, load_thresholds
from spectral_guard.verdict import STATUSES

OFF = Thresholds(Rule(), (), {})


def sr_of(W) -> float:
    """Stable rank by numpy's float64 SVD (tests/reference.py)."""
    return reference.stable_rank(reference.singular_values(W))


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many row chunks per matrix, so chunk boundaries are exercised."""
    monkeypatch.setattr(measure_mod, "chunk_rows", lambda cols, itemsize, chunk_bytes=0: 7)


def by_name(report) -> dict:
    return {m.name: m for m in report.matrices}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_biopsy_matches_in_memory_biopsy_and_float64_reference(tmp_path, dtype,
                                                                        small_chunks):
    gen = torch.Generator().manual_seed(3)
    W = (torch.randn(300, 40, generator=gen) @ torch.randn(40, 250, generator=gen)
         + 3.0 * torch.randn(300, 250, generator=gen)).to(dtype)
    p = tmp_path / "m.safetensors"
    save_file({"layer.weight": W}, str(p))
    rep = audit(p, mode="biopsy", limit=64, seed=5, thresholds=OFF)
    m = rep.matrices[0]
    assert m.measured_shape == (64, 48) and m.shape == (300, 250)
    seed = name_seed(5, "layer.weight")
    rows = biopsy_indices((300, 1), 64, seed)[0]
    cols = biopsy_indices((250, 1), 48, seed + 1)[0]
    assert torch.equal(rows, audit_mod.audit_biopsy_indices((300, 250), 64, seed)[0])
    ref = reference.metrics(W[rows][:, cols], alpha=False)
    for key, value in ref.items():
        assert getattr(m, key) == pytest.approx(value, rel=1e-4), key
    mem = spectral_metrics(W[rows][:, cols], mode="exact")
    assert m.stable_rank == pytest.approx(mem.stable_rank, rel=1e-6)
    # same xmin and tail (5 of 48 eigenvalues); the MLE over so few log eigenvalues turns the
    # float32-SVD vs float64-Gram eigenvalue differences (up to 9e-7 here) into 1.3e-6 on alpha
    assert m.alpha == pytest.approx(mem.alpha, rel=1e-5)


def test_biopsy_shape_rule():
    assert audit_mod.audit_biopsy_indices((100, 90), 128, 0) == (None, None)
    for shape, expect in (((2048, 5632), (384, 512)), ((5632, 2048), (512, 384)),
                          ((600, 600), (512, 384)), ((256, 2048), (256, 512)),
                          ((32000, 300), (512, 300))):
        rows, cols = audit_mod.audit_biopsy_indices(shape, 512, 7)
        got = (shape[0] if rows is None else len(rows), shape[1] if cols is None else len(cols))
        assert got == expect, shape
        for idx, size in ((rows, shape[0]), (cols, shape[1])):
            if idx is not None:
                assert torch.all(idx[1:] > idx[:-1]) and int(idx[-1]) < size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("wide", [False, True])
def test_exact_mode_matches_float64_reference(tmp_path, dtype, wide, small_chunks):
    gen = torch.Generator().manual_seed(4)
    W = (torch.randn(90, 70, generator=gen) * torch.logspace(0, -2, 70)).to(dtype)
    if wide:  # decomposed transposed internally
        W = W.T.contiguous()
    p = tmp_path / "m.safetensors"
    save_file({"w": W}, str(p))
    m = audit(p, mode="exact", thresholds=OFF).matrices[0]
    assert m.measured_shape == tuple(W.shape) and m.shape == tuple(W.shape)
    for key, value in reference.metrics(W, alpha=False).items():
        assert getattr(m, key) == pytest.approx(value, rel=1e-4), key


def test_small_matrix_biopsy_equals_exact(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(gaussian_matrices(), str(p))
    a = by_name(audit(p, mode="biopsy", limit=512, thresholds=OFF))
    b = by_name(audit(p, mode="exact", thresholds=OFF))
    assert set(a) == set(b) == set(gaussian_matrices())  # every matrix, in both modes
    for name in a:  # same matrix; biopsy: float64 Gram eigenvalues, exact: float32 SVD
        assert a[name].measured_shape == b[name].measured_shape
        assert a[name].stable_rank == pytest.approx(b[name].stable_rank, rel=1e-5)
        assert a[name].condition_number == pytest.approx(b[name].condition_number, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("mode", ["biopsy", "exact"])
def test_hygiene_counts_across_chunks(tmp_path, dtype, mode, small_chunks):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(50, 30, generator=gen)
    W[[3, 7, 8, 40]] = 0.0
    W[:, [2, 29]] = 0.0
    W[10, 5] = -0.0
    W[12, 4] = math.nan
    W[33, 1] = math.nan
    if dtype != torch.float8_e4m3fn:  # e4m3fn has no infinity
        W[20, 6] = math.inf
        W[21, 6] = -math.inf
    Wd = W.to(dtype)
    p = tmp_path / "m.safetensors"
    save_file({"w": Wd}, str(p))
    m = audit(p, mode=mode, limit=16, thresholds=OFF).matrices[0]
    Wf = Wd.to(torch.float32)
    assert m.nan == int(torch.isnan(Wf).sum())
    assert m.inf == int(torch.isinf(Wf).sum())
    finite = torch.nan_to_num(Wf, nan=1.0, posinf=1.0, neginf=1.0)
    assert m.dead_rows == int((finite == 0).all(1).sum()) == 4
    assert m.dead_cols == int((finite == 0).all(0).sum()) == 2
    assert m.status == "nonfinite"
    assert m.stable_rank is None and m.condition_number is None


def test_tensor_rules_stacks_conv_and_skips(tmp_path):
    gen = torch.Generator().manual_seed(2)
    experts = torch.randn(3, 40, 24, generator=gen)
    conv2d = torch.randn(16, 4, 3, 3, generator=gen)
    conv1d = torch.randn(12, 8, 3, generator=gen)
    tensors = {"moe.experts.w": experts, "conv.weight": conv2d, "conv1d.weight": conv1d,
               "bias": torch.randn(5), "scalar": torch.tensor(1.0),
               "ids": torch.arange(6).reshape(2, 3), "mask": torch.ones(3, 3, dtype=torch.bool),
               "empty": torch.zeros(0, 4)}
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p))
    rep = audit(p, mode="exact", thresholds=OFF)
    got = by_name(rep)
    assert set(got) == {"moe.experts.w[0]", "moe.experts.w[1]", "moe.experts.w[2]",
                        "conv.weight", "conv1d.weight"}
    for e in range(3):
        m = got[f"moe.experts.w[{e}]"]
        assert m.shape == (40, 24) and m.tensor == "moe.experts.w"
        assert m.stable_rank == pytest.approx(sr_of(experts[e]), rel=1e-4)
    assert got["conv.weight"].shape == (16, 36)
    assert got["conv.weight"].stable_rank == pytest.approx(
        sr_of(conv2d.reshape(16, -1)), rel=1e-4)
    assert got["conv1d.weight"].shape == (12, 24)
    assert [got[f"moe.experts.w[{e}]"].read_as for e in range(3)] == [
        "experts[0]", "experts[1]", "experts[2]"]
    assert got["conv.weight"].read_as == got["conv1d.weight"].read_as == "conv"
    skipped = {s.name: s.reason for s in rep.skipped}
    assert set(skipped) == {"bias", "scalar", "ids", "mask", "empty"}
    assert "1-D" in skipped["bias"] and "0-D" in skipped["scalar"]
    assert "integer" in skipped["ids"] and "boolean" in skipped["mask"]
    assert "empty" in skipped["empty"]


def test_long_conv_kernel_is_a_conv_not_experts(tmp_path):
    # a conv1d STFT-like basis [258, 1, 256]: real/imaginary Fourier rows, with exact zeros
    # (the imaginary rows at frequency 0 and Nyquist): one 258 x 256 matrix read as a conv
    t = torch.arange(256, dtype=torch.float64)
    f = torch.arange(129, dtype=torch.float64)[:, None]
    window = torch.hann_window(256, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(2 * math.pi * f * t / 256), -torch.sin(2 * math.pi * f * t / 256)])
    basis = (basis * window).float()
    basis[129].zero_()
    basis[257].zero_()
    p = tmp_path / "stft.safetensors"
    save_file({"stft.forward_basis_buffer": basis[:, None, :].contiguous(),
               "encoder.0.reparam_conv.weight": torch.randn(128, 129, 3)}, str(p))
    for mode in ("biopsy", "exact"):
        rep = audit(p, mode=mode)
        got = by_name(rep)
        assert set(got) == {"stft.forward_basis_buffer", "encoder.0.reparam_conv.weight"}
        m = got["stft.forward_basis_buffer"]
        assert m.read_as == "conv" and m.shape == (258, 256) and m.tensor_shape == (258, 1, 256)
        assert m.dead_rows == 2 and m.status == "ok", m.reasons
        assert rep.exit_code == 0
    s = np.linalg.svd(basis.double().numpy(), compute_uv=False)
    assert m.stable_rank == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-4)


def test_experts_only_when_name_or_config_says_so(tmp_path):
    gen = torch.Generator().manual_seed(8)
    stack = torch.randn(4, 24, 32, generator=gen)
    p = tmp_path / "model.safetensors"
    save_file({"layers.0.mlp.w_stack": stack}, str(p))
    plain = by_name(audit(p, mode="exact", thresholds=OFF))
    assert list(plain) == ["layers.0.mlp.w_stack"]
    assert plain["layers.0.mlp.w_stack"].read_as == "conv"
    assert plain["layers.0.mlp.w_stack"].shape == (4, 24 * 32)
    # config.json next to the checkpoint gives the expert count: E == 4 -> experts
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_local_experts": 4}}))
    moe = by_name(audit(p, mode="exact", thresholds=OFF))
    assert sorted(moe) == [f"layers.0.mlp.w_stack[{e}]" for e in range(4)]
    for e in range(4):
        m = moe[f"layers.0.mlp.w_stack[{e}]"]
        assert m.read_as == f"experts[{e}]" and m.shape == (24, 32)
        assert m.stable_rank == pytest.approx(sr_of(stack[e]), rel=1e-4)
    # another expert count does not match the leading dimension: still a conv
    (tmp_path / "config.json").write_text(json.dumps({"num_experts": 8}))
    assert list(by_name(audit(p, mode="exact", thresholds=OFF))) == ["layers.0.mlp.w_stack"]


def test_read_as_in_json_csv_and_table(tmp_path):
    from rich.console import Console

    from spectral_guard.report import audit_table, render_csv

    p = tmp_path / "m.safetensors"
    save_file({"model.embed_tokens.weight": torch.randn(50, 16),
               "layers.0.fc.weight": torch.randn(16, 16),
               "conv.weight": torch.randn(8, 4, 9)}, str(p))
    rep = audit(p)
    doc = rep.to_json_dict()
    assert {m["name"]: m["read_as"] for m in doc["matrices"]} == {
        "model.embed_tokens.weight": "embedding", "layers.0.fc.weight": "linear",
        "conv.weight": "conv"}
    assert "read_as" in render_csv(rep).splitlines()[0].split(",")
    console = Console(width=200, record=True)
    console.print(audit_table(rep))
    text = console.export_text()
    assert "read as" in text and "embedding" in text and "conv" in text


def test_stacked_experts_biopsy_share_indices(tmp_path):
    gen = torch.Generator().manual_seed(9)
    experts = torch.randn(2, 100, 90, generator=gen)
    experts[1] = torch.randn(100, 2, generator=gen) @ torch.randn(2, 90, generator=gen)
    p = tmp_path / "m.safetensors"
    name = "mlp.experts.w"
    save_file({name: experts}, str(p))
    got = by_name(audit(p, mode="biopsy", limit=32, seed=1))
    assert len(got) == 2
    rows, cols = audit_mod.audit_biopsy_indices((100, 90), 32, name_seed(1, name))
    for e in range(2):
        ref = reference.metrics(experts[e][rows][:, cols], alpha=False)
        assert got[f"{name}[{e}]"].stable_rank == pytest.approx(ref["stable_rank"], rel=1e-4)
    assert got[f"{name}[0]"].status == "ok" and got[f"{name}[1]"].status == "collapsed"


def test_include_exclude_and_determinism(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(gaussian_matrices(), str(p))
    rep = audit(p, include=[r"layers\.0\."], exclude=[r"\.b\."])
    assert [m.name for m in rep.matrices] == ["layers.0.a.weight"]
    assert rep.filtered_out == 3
    with pytest.raises(CheckpointError, match="no tensor matches"):
        audit(p, include=["nothing"])
    with pytest.raises(ValueError, match="bad regular expression"):
        audit(p, include=["("])
    a = audit(p, limit=40, seed=1).to_json_dict()["matrices"]
    b = audit(p, limit=40, seed=1).to_json_dict()["matrices"]
    c = audit(p, limit=40, seed=2).to_json_dict()["matrices"]
    assert a == b
    assert [m["stable_rank"] for m in a] != [m["stable_rank"] for m in c]


@pytest.mark.parametrize("mode", ["biopsy", "exact"])
def test_progress_and_many_tensors(tmp_path, mode):
    gen = torch.Generator().manual_seed(5)
    tensors = {f"layers.{i}.w": torch.randn(40 + i, 30, generator=gen) for i in range(12)}
    tensors["layers.7.w"] = torch.zeros(47, 30)
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p))
    calls = []
    rep = audit(p, mode=mode, limit=16, progress=lambda d, t, n: calls.append((d, t, n)))
    assert sorted(n for _, _, n in calls) == sorted(tensors)
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1] == sum(
        t.numel() * 4 for t in tensors.values())
    assert [m.name for m in rep.matrices][0] == "layers.7.w"
    assert sorted(m.name for m in rep.matrices) == sorted(tensors)
    # every matrix measured on its own seeded biopsy, whatever thread handled it
    for m in rep.matrices[1:]:
        W = tensors[m.name]
        rows, cols = audit_mod.audit_biopsy_indices(tuple(W.shape), 16, name_seed(0, m.name))
        sub = W if mode == "exact" else W[rows][:, cols]
        assert m.stable_rank == pytest.approx(sr_of(sub), rel=1e-4)


def test_bad_options(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(gaussian_matrices(), str(p))
    with pytest.raises(ValueError, match="mode"):
        audit(p, mode="fast")
    with pytest.raises(ValueError, match="unknown status"):
        audit(p, fail_on=["broken"])
    with pytest.raises(ThresholdsError, match="not found"):
        audit(p, thresholds=tmp_path / "none.json")
    # the library's messages name its own parameters, never a command-line flag
    for kwargs, needle in (({"limit": 1}, "limit must be at least 2"),
                           ({"include": ["("]}, r"include pattern '\('"),
                           ({"exclude": ["["]}, r"exclude pattern '\['"),
                           ({"fail_on": ["broken"]}, "unknown status 'broken'"),
                           ({"heads": 0}, "head count must be a positive integer")):
        with pytest.raises(ValueError, match=needle) as err:
            audit(p, **kwargs)
        assert "--" not in str(err.value), str(err.value)
    with pytest.raises(CheckpointError, match="include/exclude filters") as err:
        audit(p, exclude=["."])
    assert "--" not in str(err.value)


def test_no_matrices_is_an_input_error(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"bias": torch.randn(4), "ids": torch.arange(3)}, str(p))
    with pytest.raises(CheckpointError, match="no matrices to audit"):
        audit(p)


def test_json_contract(tmp_path):
    tensors = gaussian_matrices()
    tensors["nan.weight"] = torch.full((20, 20), math.nan)
    tensors["zero.weight"] = torch.zeros(20, 20)
    tensors["bias"] = torch.randn(3)
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p))
    rep = spectral_guard.audit(p)
    doc = json.loads(json.dumps(rep.to_json_dict(), allow_nan=False))
    assert set(doc) == {"schema_version", "sources", "thresholds", "matrices", "skipped",
                        "summary", "verdict"}
    assert doc["schema_version"] == 1
    required = {"name", "shape", "dtype", "status", "reasons", "stable_rank", "stable_rank_ratio",
                "condition_number", "sigma_max", "sigma_min", "effective_rank",
                "effective_rank_ratio", "alpha", "nonfinite", "singular"}
    for m in doc["matrices"]:
        assert required <= set(m)
        assert m["status"] in STATUSES
    mats = {m["name"]: m for m in doc["matrices"]}
    assert mats["nan.weight"]["status"] == "nonfinite" and mats["nan.weight"]["nonfinite"] == 400
    assert mats["nan.weight"]["stable_rank"] is None
    assert mats["zero.weight"]["condition_number"] is None and mats["zero.weight"]["singular"]
    assert mats["zero.weight"]["status"] == "dead_units"
    assert doc["skipped"] == [{"name": "bias", "file": str(p), "shape": [3], "dtype": "F32",
                               "reason": "1-D vector (bias, norm or scale): not a matrix"}]
    assert doc["verdict"]["healthy"] is False and doc["verdict"]["exit_code"] == 1
    assert set(doc["verdict"]["failing"]) == {"nan.weight", "zero.weight"}
    assert doc["summary"]["status_counts"]["ok"] == 4
    # worst first
    order = [STATUSES.index(m["status"]) for m in doc["matrices"]]
    assert order == sorted(order)


def test_thresholds_file_and_fail_on_policy(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(gaussian_matrices(), str(p))
    strict = Thresholds(Rule(effective_rank_ratio_min=0.99), (), {"source": "test"})
    f = tmp_path / "th.json"
    strict.save(f)
    rep = audit(p, thresholds=f)
    assert all(m.status == "collapsed" for m in rep.matrices) and rep.exit_code == 1
    assert audit(p, thresholds=f, fail_on=["nonfinite"]).exit_code == 0
    assert rep.to_json_dict()["thresholds"]["source"] == str(f)


def test_sharded_folder_equals_single_file(tmp_path):
    tensors = gaussian_matrices()
    single = tmp_path / "one.safetensors"
    save_file(tensors, str(single))
    write_sharded(tmp_path / "sharded", tensors, n_shards=3)
    a = [(m.name, m.stable_rank) for m in audit(single).matrices]
    b = [(m.name, m.stable_rank) for m in audit(tmp_path / "sharded").matrices]
    assert sorted(a) == sorted(b)


# ----------------------------------------------------------------------------------------------
# Healthy trained models vs injected damage, with the shipped default thresholds


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small MLP and a tiny char-level transformer, trained once per session (seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and the box may be shared
    try:
        mlp, acc = tiny_models.train_mlp(seed=0, width=128, steps=150, batch=128)
        lm, loss, uniform = tiny_models.train_char_lm(seed=0, d=64, heads=4, ffn=256, layers=2,
                                                      ctx=32, steps=150, batch=16, lr=1e-2,
                                                      n_words=30)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("trained")
    return {"mlp": mlp, "lm": lm, "acc": acc, "loss": loss, "uniform": uniform,
            "folder": folder}


def test_trained_models_learned(trained):
    assert trained["acc"] > 0.6  # 10 classes: chance is 0.1
    assert trained["loss"] < 0.3 * trained["uniform"]


@pytest.mark.parametrize("mode", ["biopsy", "exact"])
def test_healthy_trained_models_are_not_flagged(trained, mode):
    p = trained["folder"] / "healthy.safetensors"
    save_file({**trained["mlp"], **trained["lm"]}, str(p))
    rep = audit(p, mode=mode, limit=64)
    flagged = {m.name: m.reasons for m in rep.matrices if m.status != "ok"}
    assert flagged == {}
    assert rep.exit_code == 0
    assert len(rep.matrices) == 4 + 3 + 2 * 6  # MLP; embeddings + head; 2 blocks of 6


INJECTED = {
    "mlp.fc2.weight": ("rank1", "collapsed"),
    "mlp.fc3.weight": ("dead_rows", "dead_units"),
    "model.layers.0.mlp.up_proj.weight": ("rank4", "collapsed"),
    "model.layers.0.self_attn.q_proj.weight": ("spike", "collapsed"),
    "model.layers.1.self_attn.o_proj.weight": ("zero", "dead_units"),
    "model.layers.1.mlp.down_proj.weight": ("nan", "nonfinite"),
    "model.layers.1.self_attn.v_proj.weight": ("inf", "nonfinite"),
}


@pytest.mark.parametrize("mode", ["biopsy", "exact"])
def test_injected_damage_is_flagged_exactly_where_injected(trained, mode):
    state = {**trained["mlp"], **trained["lm"]}
    for name, (kind, _) in INJECTED.items():
        state[name] = tiny_models.inject(state[name], kind, seed=0)
    p = trained["folder"] / "damaged.safetensors"
    save_file(state, str(p))
    rep = audit(p, mode=mode, limit=64)
    flagged = {m.name: m.status for m in rep.matrices if m.status != "ok"}
    assert flagged == {name: status for name, (_, status) in INJECTED.items()}
    assert rep.exit_code == 1
    assert set(rep.to_json_dict()["verdict"]["failing"]) == set(INJECTED)


def test_random_init_layers_are_not_flagged(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": (torch.randn(600, 600, generator=gen) * 0.02).to(torch.bfloat16),
        "b.weight": ((torch.rand(700, 256, generator=gen) * 2 - 1) / 16).to(torch.bfloat16),
        "c.weight": torch.randn(256, 900, generator=gen),
    }
    p = tmp_path / "init.safetensors"
    save_file(tensors, str(p))
    for mode in ("biopsy", "exact"):
        rep = audit(p, mode=mode, limit=256)
        assert sorted(m.name for m in rep.matrices) == sorted(tensors)  # all three audited
        assert {m.name: m.reasons for m in rep.matrices if m.status != "ok"} == {}


@pytest.mark.parametrize("mode", ["biopsy", "exact"])
def test_dead_columns_zero_in_first_row_only(tmp_path, mode, small_chunks):
    # dead-column candidates start from the first row's zeros: columns that are zero there
    # (and in the first chunks) but not further down must not be counted
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(40, 24, generator=gen)
    W[:30, :10] = 0.0  # zero in the first chunks only
    W[0, 10:14] = -0.0
    W[:, [3, 17]] = 0.0  # dead
    W[5, 17] = -0.0
    p = tmp_path / "m.safetensors"
    save_file({"w": W.to(torch.bfloat16)}, str(p))
    m = audit(p, mode=mode, limit=16, thresholds=OFF).matrices[0]
    assert m.dead_cols == 2
    assert m.dead_rows == 0


def test_measure_matrices_is_the_audit_without_a_verdict(tmp_path):
    # the public measuring entry calibration uses: same matrices, same values, no status
    from spectral_guard.audit import judge_results, measure_matrices

    tensors = gaussian_matrices()
    tensors["layers.2.dead.weight"] = torch.zeros(40, 30)
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p))
    for mode in ("biopsy", "exact"):
        measured = measure_matrices(p, mode=mode, limit=48, seed=3)
        assert sorted(m.name for m in measured) == sorted(tensors)
        assert all(m.status == "ok" and m.group is None and m.reasons == [] for m in measured)
        audited = by_name(audit(p, mode=mode, limit=48, seed=3))
        for m in measured:
            a = audited[m.name]
            assert (m.stable_rank, m.condition_number, m.alpha, m.dead_rows, m.measured_shape) \
                == (a.stable_rank, a.condition_number, a.alpha, a.dead_rows, a.measured_shape)
        judge_results(measured, load_thresholds(None))
        assert {m.name: m.status for m in measured} == {n: a.status for n, a in audited.items()}
        assert audited["layers.2.dead.weight"].status == "dead_units"
