"""Shared test set-up: a deterministic hypothesis profile and seeded matrix builders."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Derandomized: the same examples on every run and machine, no wall-clock deadline (CI boxes
# with 2 cores are slow and noisy). Override with HYPOTHESIS_PROFILE=dev for a wider search.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread, then restore the setting.

    The sensor tests decompose many small matrices; on a 2-core box shared with other jobs,
    a 2-thread OpenMP pool spin-waiting against them made one 1024 x 1024 SVD ~100x slower
    (0.2 s -> 20 s). One thread keeps these tests' run time predictable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    """A private CPU generator, so tests never depend on the global RNG or on each other."""
    return torch.Generator().manual_seed(seed)


def haar_orthogonal(n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A Haar-distributed ``n x n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def with_singular_values(m: int, n: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``U diag(s) V^T`` (float64) with Haar ``U, V``: a matrix whose spectrum is ``s``."""
    k = min(m, n)
    assert s.numel() == k
    U = haar_orthogonal(m, g)[:, :k]
    V = haar_orthogonal(n, g)[:, :k]
    return (U * s.to(torch.float64)) @ V.T


def pareto_quantiles(k: int, alpha: float) -> torch.Tensor:
    """``k`` evenly spaced quantiles of the density ``p(x) ~ x^-alpha`` on ``[1, inf)``,
    descending. Deterministic, so a fit on them has no sampling error to speak of."""
    u = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    return u ** (-1.0 / (alpha - 1.0))


def trained_like(m: int, n: int, g: torch.Generator, alpha: float = 3.0) -> torch.Tensor:
    """Heavy-tailed "trained-like" float32 matrix: squared singular values (the ESD) follow a
    power law with exponent ``alpha`` (Pareto samples), singular vectors Haar."""
    k = min(m, n)
    x = (1.0 - torch.rand(k, generator=g, dtype=torch.float64)) ** (-1.0 / (alpha - 1.0))
    s = torch.sort(x.sqrt(), descending=True).values
    return with_singular_values(m, n, s, g).float()
