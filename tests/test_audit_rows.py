"""The row-normalized stable rank and the collapse law that reads it, on real safetensors files.

Values are checked against the numpy reference (tests/reference.py: rows divided by their
norms in a loop, numpy's float64 SVD). The law: where one direction holds the energy
(``SR < stable_rank_min``), a matrix is collapsed only if its rows, scaled to unit norm, also
point the same way (``row_SR < row_stable_rank_min``); embeddings and heads are judged by the
effective-rank floor only. See spectral_guard/verdict.py and docs/metrics.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as R
import torch
from audit_fixtures import tiny_models
from safetensors.torch import load_file, save_file

import spectral_guard.audit.rows as rows_mod
from spectral_guard.audit import audit, audit_biopsy_indices, measure_matrices
from spectral_guard.estimators import name_seed
from spectral_guard.thresholds import default_thresholds

TRAINED = Path(__file__).parent / "data" / "trained"
FIXTURES = ("gpt2_tiny", "llama_tiny")
MODES = ("biopsy", "exact")


def few_huge_rows(m: int = 128, n: int = 192, seed: int = 0) -> torch.Tensor:
    """Gaussian rows, one of them 40x and two 10x longer (pointing different ways): the energy
    sits in a few output channels, as in silero-vad's conv3/conv4, but the rows do not align."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) / n**0.5
    W[3] *= 40.0
    W[[m // 3, m // 2]] *= 10.0
    return W


def spiked(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return tiny_models.inject(torch.randn(m, n, generator=g), "spike", seed=seed)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(96, 64, generator=torch.Generator().manual_seed(1)),
    lambda: torch.randn(40, 300, generator=torch.Generator().manual_seed(2)),
    lambda: few_huge_rows(),
    lambda: spiked(64, 128, 3),
    lambda: torch.randn(50, 1, generator=torch.Generator().manual_seed(4))
    * torch.randn(1, 70, generator=torch.Generator().manual_seed(5)),  # rank 1
])
@pytest.mark.parametrize("eig_max, dtype, rel", [
    (rows_mod.EIG_MAX, torch.float32, 1e-9),  # float64 Gram + eigvalsh (every biopsy)
    (0, torch.float32, 1e-6),  # Lanczos on N in float32 (exact mode, k > EIG_MAX)
    (0, torch.float64, 1e-9),  # ... in float64 (F64 storage)
])
def test_row_stable_rank_matches_numpy(make, eig_max, dtype, rel, monkeypatch):
    monkeypatch.setattr(rows_mod, "EIG_MAX", eig_max)
    W = make().to(dtype)
    assert rows_mod.row_stable_rank(W) == pytest.approx(R.row_stable_rank(W), rel=rel)


def test_row_stable_rank_edge_cases():
    W = torch.randn(20, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W[[2, 7]] = 0.0  # all-zero rows are left out (they are dead units, not a direction)
    assert rows_mod.row_stable_rank(W) == pytest.approx(R.row_stable_rank(W), rel=1e-9)
    # invariant under scaling each row
    scale = torch.rand(20, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rows_mod.row_stable_rank(W * (scale * 1e3 + 1e-3)) == pytest.approx(
        rows_mod.row_stable_rank(W), rel=1e-9)
    assert rows_mod.row_stable_rank(torch.zeros(5, 4)) is None
    assert rows_mod.row_stable_rank(torch.full((4, 3), float("nan"))) is None
    assert rows_mod.row_stable_rank(torch.ones(1, 9)) == 1.0
    assert rows_mod.row_stable_rank(torch.ones(6, 9)) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_audit_reports_the_row_stable_rank_of_the_measured_matrix(tmp_path, mode):
    # a 300 x 200 matrix is biopsied at limit 64 (64 x 48 submatrix), measured whole in exact
    # mode; float32 storage, float64 arithmetic
    g = torch.Generator().manual_seed(7)
    tensors = {"blocks.0.mlp.fc1.weight": torch.randn(300, 200, generator=g),
               "blocks.0.mlp.fc2.weight": few_huge_rows(100, 60, seed=8)}
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p))
    rep = audit(p, mode=mode, limit=64)
    assert len(rep.matrices) == 2
    for m in rep.matrices:
        W = tensors[m.name].double()
        if mode == "biopsy":
            ri, ci = audit_biopsy_indices(tuple(W.shape), 64, name_seed(0, m.name))
            W = W if ri is None else W[ri]
            W = W if ci is None else W[:, ci]
        assert tuple(W.shape) == m.measured_shape
        # measured only under a stable-rank floor of the thresholds (1.5 by default), where
        # it can decide the verdict; measure_matrices (calibration) measures it everywhere
        if m.stable_rank < 1.5:
            assert m.row_stable_rank == pytest.approx(R.row_stable_rank(W), rel=1e-9)
        else:
            assert m.row_stable_rank is None
        assert m.to_json_dict()["row_stable_rank"] == m.row_stable_rank
    assert sum(m.row_stable_rank is not None for m in rep.matrices) == 1  # the few huge rows
    for m in measure_matrices(p, mode=mode, limit=64):
        assert m.row_stable_rank is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_matrix_with_a_few_huge_rows_is_ok(tmp_path, mode):
    W = few_huge_rows()
    ref_sr = R.stable_rank(R.singular_values(W))
    assert ref_sr < default_thresholds().default.stable_rank_min  # the SR floor alone flags it
    p = tmp_path / "conv.safetensors"
    save_file({"conv4.weight": W.reshape(128, 64, 3).contiguous()}, str(p))
    (m,) = audit(p, mode=mode).matrices
    assert m.read_as == "conv" and m.stable_rank < 1.5
    assert m.row_stable_rank > 2 * default_thresholds().default.row_stable_rank_min
    assert (m.status, m.reasons) == ("ok", [])


def _fixture_state(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(TRAINED / name / "model.safetensors"))


def _hidden(state: dict[str, torch.Tensor]) -> list[str]:
    th = default_thresholds()
    return sorted(k for k, v in state.items() if v.dim() == 2 and th.group_for(k) is None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_tiny_trained_fixtures_are_healthy(fixture, mode):
    # the committed byte-level GPT-2 and Llama (trained on the Python stdlib): their token
    # embeddings and heads have a dominant shared direction (the never-seen bytes converge to
    # one vector), which is healthy; the CI stand-in for the real-model corpus
    rep = audit(TRAINED / fixture, mode=mode)
    state = _fixture_state(fixture)
    assert {m.tensor for m in rep.matrices} == {k for k, v in state.items() if v.dim() == 2}
    assert {m.name: m.reasons for m in rep.matrices if m.status != "ok"} == {}
    assert rep.exit_code == 0
    # the case the row check is for is present: a byte embedding/head with SR near 1 (the
    # row-normalized stable rank is measured there, under the largest floor, and only there)
    low = [m for m in rep.matrices if m.stable_rank < 1.5]
    assert low and all(m.group == "embeddings_and_heads" for m in low)
    assert all((m.row_stable_rank is not None) == (m.stable_rank < 1.5) for m in rep.matrices)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["rank1", "rank4", "spike"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_injections_in_every_hidden_matrix_are_caught(tmp_path, fixture, kind, mode):
    # q, k, v, o and the MLP matrices of both layers (GPT-2: fused c_attn, c_proj, c_fc,
    # mlp.c_proj); rank-1/rank-4 at equal Frobenius norm, spike W + 3 ||W||_F u v^T
    state = _fixture_state(fixture)
    hidden = _hidden(state)
    assert len(hidden) == (8 if fixture == "gpt2_tiny" else 14)
    for name in hidden:
        state[name] = tiny_models.inject(state[name], kind, seed=0)
    p = tmp_path / "damaged.safetensors"
    save_file(state, str(p))
    rep = audit(p, mode=mode, limit=64)
    flagged = {m.name: m.status for m in rep.matrices if m.status != "ok"}
    damaged = [m.name for m in rep.matrices if m.tensor in hidden]  # fused qkv: q, k, v
    assert len(damaged) == (12 if fixture == "gpt2_tiny" else 14)
    assert flagged == dict.fromkeys(damaged, "collapsed")
    assert rep.exit_code == 1
    for m in rep.matrices:
        if m.tensor in hidden and m.stable_rank < 1.5:  # the reason says both numbers
            assert any("row-normalized stable rank" in r for r in m.reasons), m.reasons


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_a_rank1_embedding_or_head_is_caught(tmp_path, fixture, mode):
    state = _fixture_state(fixture)
    th = default_thresholds()
    targets = sorted(k for k, v in state.items()
                     if v.dim() == 2 and th.group_for(k) == "embeddings_and_heads")
    for name in targets:
        state[name] = tiny_models.inject(state[name], "rank1", seed=0)
    p = tmp_path / "rank1_embedding.safetensors"
    save_file(state, str(p))
    rep = audit(p, mode=mode)
    flagged = {m.name: m.reasons for m in rep.matrices if m.status != "ok"}
    assert set(flagged) == set(targets)
    for reasons in flagged.values():
        assert len(reasons) == 1 and reasons[0].startswith("effective-rank ratio")
    assert rep.exit_code == 1
