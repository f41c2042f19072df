"""The audit's alpha estimators: the default power-law fit and the named faster one, each
checked against the numpy loop references of tests/reference.py on a real safetensors file."""

from __future__ import annotations

import pytest
import reference
import torch
from safetensors.torch import save_file

from spectral_guard.audit import audit


@pytest.fixture
def heavy_tailed(tmp_path):
    # singular values with a power-law tail, so the two estimators read different numbers
    g = torch.Generator().manual_seed(3)
    k = 80
    s = (1.0 - torch.rand(k, generator=g, dtype=torch.float64)) ** (-1.0 / 3.0)
    U, _ = torch.linalg.qr(torch.randn(120, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    W = (U * s) @ V.T
    path = tmp_path / "w.safetensors"
    save_file({"layer.weight": W}, str(path))
    return path, W


def test_default_alpha_is_the_power_law_fit(heavy_tailed):
    path, W = heavy_tailed
    rep = audit(path, mode="exact")
    eigs = reference.singular_values(W) ** 2
    expected = reference.powerlaw_fit(eigs, thresh=0.0)[0]
    assert [m.alpha for m in rep.matrices] == [pytest.approx(expected, rel=1e-9)]
    assert rep.to_json_dict()["summary"]["alpha_estimator"] == "csn"


def test_hill_median_is_an_explicit_option(heavy_tailed):
    path, W = heavy_tailed
    rep = audit(path, mode="exact", alpha="hill_median")
    eigs = reference.singular_values(W) ** 2
    expected = reference.hill_median_alpha(eigs)
    assert [m.alpha for m in rep.matrices] == [pytest.approx(expected, rel=1e-9)]
    assert rep.to_json_dict()["summary"]["alpha_estimator"] == "hill_median"
    # a different estimator, not a different rounding of the same one
    assert abs(rep.matrices[0].alpha - audit(path, mode="exact").matrices[0].alpha) > 0.1


def test_unknown_alpha_estimator_is_a_one_line_error(heavy_tailed):
    with pytest.raises(ValueError, match="unknown alpha estimator 'wls'"):
        audit(heavy_tailed[0], alpha="wls")


def test_alpha_bounds_judge_only_their_own_estimator(heavy_tailed, tmp_path):
    """A calibrated file's alpha bounds were learned with one estimator; an audit with the other
    refuses them (one line), and a file that does not say which gets a note."""
    from dataclasses import replace

    from spectral_guard.calibration import calibrate
    from spectral_guard.thresholds import load_thresholds

    path, _ = heavy_tailed
    th = calibrate(path, mode="exact").thresholds
    assert th.provenance["alpha_estimator"] == "csn"
    th = replace(th, default=replace(th.default, alpha_min=1.0, alpha_max=50.0))
    saved = tmp_path / "th.json"
    th.save(saved)
    assert audit(path, mode="exact", thresholds=saved).exit_code == 0
    with pytest.raises(ValueError, match=r"learned with the 'csn' alpha estimator.*--alpha csn"):
        audit(path, mode="exact", thresholds=saved, alpha="hill_median")
    unnamed = replace(load_thresholds(saved), provenance={})
    rep = audit(path, mode="exact", thresholds=unnamed, alpha="hill_median")
    assert any("without saying which alpha estimator" in n for n in rep.plan_notes)
    # bounds outside the references' alpha: the judge uses them (the note is not a skip)
    strict = replace(unnamed, groups=(), default=replace(unnamed.default, alpha_max=1.01))
    assert audit(path, mode="exact", thresholds=strict).matrices[0].status == "suspicious"
