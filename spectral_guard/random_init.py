"""The Marchenko-Pastur "looks randomly initialized" test, used by calibration and the guard.

For an ``m x n`` matrix with i.i.d. entries (any random initialization), the squared singular
values divided by ``q sigma^2`` (``p = min(m, n)``, ``q = max(m, n)``, ``y = p / q``) follow the
Marchenko-Pastur law on ``[(1 - sqrt y)^2, (1 + sqrt y)^2]``. With ``sigma^2`` estimated as
``||W||_F^2 / (p q)``, two statistics compare a measured matrix with that law: the top edge
``e = sigma_max sqrt(p) / (||W||_F (1 + sqrt y))`` (1 at the MP edge; training grows outlier
directions, e > 1) and the effective rank relative to the MP spectrum's
``r = erank(W) / erank(MP_{p, q})`` (training concentrates the spectrum, r < 1). A matrix is
*MP-like* when ``e <= MP_EDGE_MAX`` and ``r >= MP_ERANK_MIN`` (measured values in
docs/calibration.md).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

MP_EDGE_MAX = 1.08
"""A matrix is MP-like when its top-edge statistic ``e`` is at most this (random: <= 1.014)."""
MP_ERANK_MIN = 0.96
"""... and its effective rank is at least this fraction of the MP spectrum's (random >= 0.989)."""
MP_MIN_SIDE = 16
"""Matrices with a measured side shorter than this are not judged (too few eigenvalues)."""
RANDOM_FRACTION = 0.5
"""A reference set looks random when more than this fraction of judged matrices is MP-like."""


@lru_cache(maxsize=256)
def mp_quantiles(p: int, q: int, grid: int = 4097) -> tuple[float, ...]:
    """The ``p`` midpoint quantiles ``F^-1((i - 1/2) / p)`` of the Marchenko-Pastur law with
    ratio ``y = p / q`` (variance 1), ascending.

    Density ``f(x) = sqrt((b - x)(x - a)) / (2 pi y x)`` on ``[a, b] = [(1 - sqrt y)^2,
    (1 + sqrt y)^2]``. The CDF is integrated in ``x = a + (b - a)(1 - cos t) / 2``, where the
    integrand ``((b - a)/2)^2 sin^2 t / (2 pi y x)`` is smooth (trapezoid rule on ``grid``
    points), then inverted by linear interpolation.
    """
    y = p / q
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    t = torch.linspace(0, math.pi, grid, dtype=torch.float64)
    x = a + (b - a) * (1 - torch.cos(t)) / 2
    half = (b - a) / 2
    with torch.no_grad():
        w = half**2 * torch.sin(t) ** 2 / (2 * math.pi * y * x.clamp_min(1e-300))
        if a == 0.0:  # y = 1: sin^2 t / x -> 4 / (b - a) as t -> 0
            w[0] = half**2 * (4 / (b - a)) / (2 * math.pi * y)
        steps = (w[1:] + w[:-1]) / 2 * (t[1] - t[0])
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
        cdf = cdf / cdf[-1]
        u = (torch.arange(p, dtype=torch.float64) + 0.5) / p
        idx = torch.searchsorted(cdf, u).clamp(1, grid - 1)
        c0, c1 = cdf[idx - 1], cdf[idx]
        out = x[idx - 1] + (u - c0) / (c1 - c0).clamp_min(1e-300) * (x[idx] - x[idx - 1])
    return tuple(float(v) for v in out)


@lru_cache(maxsize=256)
def mp_effective_rank(p: int, q: int) -> float:
    """Roy-Vetterli effective rank of the MP singular values ``sqrt(quantiles)`` (scale-free)."""
    s = torch.tensor(mp_quantiles(p, q), dtype=torch.float64).sqrt()
    prob = s / s.sum()
    return float(torch.exp(-(prob * torch.log(prob)).sum()))


def mp_spectrum_statistics(top_over_frobenius: float, effective_rank: float,
                           shape: tuple[int, int]) -> tuple[float, float] | None:
    """``(e, r)`` (module docstring) from ``sigma_max / ||W||_F``, the effective rank and the
    measured shape, or ``None`` when not judged (a side under ``MP_MIN_SIDE``)."""
    p, q = sorted(int(d) for d in shape)
    if p < MP_MIN_SIDE:
        return None
    edge = top_over_frobenius * math.sqrt(p) / (1 + math.sqrt(p / q))
    return edge, effective_rank / mp_effective_rank(p, q)


def is_mp_like(edge: float, erank_ratio: float) -> bool:
    """Both statistics within the bounds of a random matrix."""
    return edge <= MP_EDGE_MAX and erank_ratio >= MP_ERANK_MIN
