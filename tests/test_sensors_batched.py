"""The stacked sensors the audit's biopsy mode decomposes with (one call per stack of
same-shape biopsies) against the numpy reference and against the one-matrix functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as R
import torch

from spectral_guard import sensors as S
from spectral_guard.audit import measure
from spectral_guard.audit.measure import _decompose, _decompose_biopsies, _read_tensor


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stack(seed: int = 0) -> torch.Tensor:
    """Six 40 x 30 matrices: noise, heavy-tailed (scaled columns), rank 3, a zero row, a
    duplicated row, and a rank-1 matrix (one non-zero eigenvalue: no fit)."""
    g = gen(seed)
    noise = torch.randn(40, 30, generator=g, dtype=torch.float64)
    heavy = noise * torch.logspace(0, 2, 30, dtype=torch.float64)
    low = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 30, generator=g, dtype=torch.float64)
    zero_row = torch.randn(40, 30, generator=g, dtype=torch.float64)
    zero_row[7] = 0
    dup = torch.randn(40, 30, generator=g, dtype=torch.float64)
    dup[5] = 2.5 * dup[11]
    rank1 = torch.outer(torch.randn(40, generator=g, dtype=torch.float64),
                        torch.randn(30, generator=g, dtype=torch.float64))
    return torch.stack([noise, heavy, low, zero_row, dup, rank1])


def test_powerlaw_fits_equal_one_by_one_and_the_loop_reference():
    g = gen(1)
    # Pareto-like ESDs of one size, and one with a tied pair (first minimum wins)
    lam = torch.sort((torch.rand(5, 64, generator=g, dtype=torch.float64) + 0.05)
                     ** -1.5, dim=1).values
    lam[3, 10] = lam[3, 11]
    fits = S.powerlaw_fits(lam)
    for row, fit in zip(lam, fits, strict=True):
        assert fit.as_dict() == S.powerlaw_fit(row).as_dict()
        alpha, xmin, D, n_tail = R.powerlaw_fit(row.numpy(), thresh=0.0)
        assert fit.alpha == pytest.approx(alpha, rel=1e-10)
        assert (fit.xmin, fit.n_tail) == (pytest.approx(xmin, rel=0), n_tail)
        assert fit.D == pytest.approx(D, abs=1e-12)
    # the blocked path (N > 256) batched equals the blocked path alone
    big = torch.sort(torch.rand(2, 300, generator=g, dtype=torch.float64) ** -2, dim=1).values
    for row, fit in zip(big, S.powerlaw_fits(big, chunk_elements=2000), strict=True):
        assert fit.as_dict() == S.powerlaw_fit(row, chunk_elements=2000).as_dict()
    with pytest.raises(ValueError, match="at least"):
        S.powerlaw_fits(lam[:, :S.SMALL_N - 1])


def test_duplicate_rows_batched_against_numpy():
    stack = _stack().to(torch.float32)
    got = S.duplicate_rows_batched(stack)
    for W, n in zip(stack, got, strict=True):
        rows = W.numpy().astype(np.float64)
        norms = np.linalg.norm(rows, axis=1)
        unit = rows[norms > 0] / norms[norms > 0, None]
        cos = unit @ unit.T
        np.fill_diagonal(cos, -2)
        assert n == int((cos >= 0.999).any(axis=1).sum()) == S.duplicate_rows(W)
    assert got[4] == 2 and got[5] == 40  # the copied pair; every row of a rank-1 matrix
    with pytest.raises(ValueError, match="positive"):
        S.duplicate_rows_batched(stack, 0.0)


@pytest.mark.parametrize("alpha", ["csn", "hill_median", False])
def test_metrics_batched_against_numpy_and_one_by_one(alpha):
    stack = _stack()
    s = torch.linalg.svdvals(stack)
    rtol = S.rank_rtol((40, 30), torch.float64)
    batched = S.metrics_from_singular_values_batched(s, (40, 30), rtol, alpha=alpha)
    for i, (W, met) in enumerate(zip(stack, batched, strict=True)):
        alone = S.metrics_from_singular_values(s[i], (40, 30), rtol, alpha=alpha)
        for key, value in met.as_dict().items():
            want = alone.as_dict()[key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(want), key
            else:
                assert value == pytest.approx(want, rel=1e-12), key
        ref = R.metrics(W.numpy(), alpha=False)
        for key in ("stable_rank", "effective_rank", "frobenius", "sigma_max"):
            assert met.as_dict()[key] == pytest.approx(ref[key], rel=1e-9), key
        if i == 2:  # rank 3: singular (the rank tolerance), 3 eigenvalues, small-sample fit
            assert math.isinf(met.condition_number)
        if i == 5:
            assert math.isnan(met.alpha)  # one non-zero eigenvalue: no fit
    if alpha == "csn":  # full-rank rows: the reference fit of s^2
        for i in (0, 1, 3, 4):
            ref_alpha = R.powerlaw_fit((s[i] ** 2).numpy(), thresh=0.0)[0]
            assert batched[i].alpha == pytest.approx(ref_alpha, rel=1e-10)


def test_stacked_biopsies_measure_what_one_by_one_measures(tmp_path):
    """The audit's stacked decomposition fills every field as the per-tensor path does."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    g = gen(3)
    tensors = {f"layers.{i}.{kind}.weight": (torch.randn(shape, generator=g) * 0.02).to(dtype)
               for i in range(3) for kind, shape, dtype in (
                   ("up", (300, 160), torch.bfloat16), ("down", (160, 300), torch.bfloat16),
                   ("q", (160, 160), torch.float32))}
    tensors["layers.0.q.weight"][:, :40] = 0  # dead inputs
    tensors["layers.1.q.weight"][3, 3] = math.nan  # not decomposed
    tensors["layers.2.q.weight"] = torch.outer(torch.randn(160, generator=g),
                                               torch.randn(160, generator=g))  # rank 1
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    plan = measure.plan_checkpoint(measure.open_source(path), [], [], None, None)

    def measured_fields(stacked: bool) -> list[dict]:
        reads = [_read_tensor(p, "biopsy", 128, 0) for p in plan.plans]
        assert all(measure._stackable(*r) for r in reads)
        if stacked:
            with ThreadPoolExecutor(2) as pool:
                _decompose_biopsies(reads, "csn", math.inf, pool)
        else:
            for r in reads:
                _decompose(*r, "biopsy", "csn", math.inf)
        return [dict(vars(res)) for results, _ in reads for res in results]

    stacked, alone = measured_fields(True), measured_fields(False)
    assert [r["name"] for r in stacked] == [r["name"] for r in alone]
    for a, b in zip(stacked, alone, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                # the same values: a matrix's values do not depend on its stack
                assert a[key] == pytest.approx(b[key], rel=0, nan_ok=True), (a["name"], key)
            else:
                assert a[key] == b[key], (a["name"], key)
    by_name = {r["name"]: r for r in stacked}
    assert by_name["layers.1.q.weight"]["nonfinite"] == 1
    assert by_name["layers.1.q.weight"]["stable_rank"] is None
    assert by_name["layers.2.q.weight"]["stable_rank"] == pytest.approx(1.0, rel=1e-6)
    assert by_name["layers.0.q.weight"]["dead_cols"] == 40
    assert by_name["layers.0.up.weight"]["row_stable_rank"] is not None  # under inf: measured
