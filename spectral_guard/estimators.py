"""How a sensor is computed: exact SVD, biopsy, warm power iteration, batching.

Costs for an ``m x n`` matrix, ``k = min(m, n)``:

* exact          one full SVD, ``O(m n k)``; float32 by default, float64 on request.
* biopsy         the SVD of a seeded ``r x c`` submatrix (``r, c <= limit``), ``O(r c min(r, c))``;
                 ratios (SR/k, erank/k) and kappa are those of the submatrix, which estimate the
                 full matrix's with errors and biases measured in tests and docs/metrics.md
                 (``keep_aspect=True`` removes the aspect-ratio bias of rectangular matrices).
* power          ``n_iter`` matrix-vector pairs, ``O(m n)`` each; warm-started from the caller's
                 state, one iteration tracks a slowly moving ``sigma_max``.
* batched        one batched SVD (or bmm power iteration) over a stack of same-shape matrices.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from .sensors import (
    SpectralMetrics,
    as_compute_tensor,
    metrics_from_singular_values,
    nonfinite_metrics,
    rank_rtol,
)

Tensor = torch.Tensor
Mode = Literal["exact", "biopsy"]


def name_seed(seed: int, name: str) -> int:
    """A per-tensor seed that is stable across processes and runs (CRC32, not ``hash()``)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged), then restore.

    Biopsy-size linear algebra gains nothing from threads, and on a busy CPU the OpenMP team of
    one small LAPACK call can wait hundreds of ms for cores (measured on a loaded 2-core
    machine: a 256 x 256 SVD took 900 ms with 2 threads and 3 ms with 1).
    """
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def gram_singular_values(M: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Descending singular values as ``sqrt(eig(G))`` of the smaller Gram matrix.

    ``G = M^T M`` (or ``M M^T`` when ``M`` is wide), in ``dtype`` (default: ``M``'s). One
    symmetric eigendecomposition of size ``min(m, n)``: 1.5-5x cheaper than ``svdvals`` at
    biopsy sizes on CPU. The relative error of ``s_i`` is about ``eps * (s_1 / s_i)^2``
    (``eps`` of ``dtype``): fine for stable and effective rank; in float32 it does not resolve
    condition numbers above ~1e3 (use ``svdvals`` or float64 for those).
    """
    X = M if dtype is None else M.to(dtype)
    G = X.mT @ X if X.shape[-2] >= X.shape[-1] else X @ X.mT
    return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0).sqrt()


@contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Run the block with autocast off for ``device_type`` (sensor math ignores the caller's
    mixed-precision region: a bf16 Gram matrix hides a collapse behind its rounding noise, and
    CUDA has no bf16/fp16 ``eigvalsh``)."""
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


SMALL_GRAM = 1024
"""Largest side decomposed through the Gram matrix by :func:`singular_values_at`."""


def singular_values_at(M: Tensor, precision: torch.dtype = torch.float64,
                       method: Literal["auto", "gram", "svd"] = "auto") -> Tensor:
    """Descending singular values of a finite matrix (or a stack), computed in ``precision``.

    The one place where the audit and the guard turn a (biopsy) matrix into singular values.
    ``M`` is upcast to ``precision`` (never downcast below its storage precision: a float64
    ``M`` stays float64), outside any autocast region.

    * ``"gram"``: ``sqrt(eig(G))`` of the smaller Gram matrix (:func:`gram_singular_values`);
      relative error of ``s_i`` about ``eps(precision) (s_1 / s_i)^2``: in float64 below 1e-4
      until ``s_1 / s_i ~ 1e6``; 1.5-5x cheaper than ``svdvals`` at biopsy sizes on CPU.
    * ``"svd"``: ``torch.linalg.svdvals`` (relative error ``eps s_1 / s_i``).
    * ``"auto"``: ``"gram"`` when both sides are ``<= SMALL_GRAM`` and the precision is
      float64, else ``"svd"``.
    """
    if M.dtype == torch.float64:
        precision = torch.float64
    if method == "auto":
        method = "gram" if precision == torch.float64 and max(M.shape[-2:]) <= SMALL_GRAM \
            else "svd"
    with no_autocast(M.device.type):
        X = M.detach().to(precision)
        if method == "gram":
            return gram_singular_values(X)
        if method == "svd":
            return torch.linalg.svdvals(X)
    raise ValueError(f"unknown method {method!r}: use 'auto', 'gram' or 'svd'")


# ----------------------------------------------------------------------------------------------
# Biopsy


KEEP_ASPECT_MIN_SIDE = 32


def biopsy_shape(shape: tuple[int, int], limit: int, keep_aspect: bool = False
                 ) -> tuple[int, int]:
    """Shape ``(r, c)`` of the biopsy of an ``m x n`` matrix.

    Default (the ASSR paper's rule): each axis is cut to ``limit`` independently, so a tall
    ``4096 x 1024`` matrix gives a square ``512 x 512`` biopsy. ``keep_aspect=True`` scales both
    axes by ``limit / max(m, n)`` instead (``512 x 128``), keeping ``m / n`` and with it the
    Marchenko-Pastur shape that SR ratio, erank ratio and kappa depend on; the short side never
    drops below ``min(short side, 32)``.
    """
    m, n = shape
    if not keep_aspect or max(m, n) <= limit:
        return min(m, limit), min(n, limit)
    scale = limit / max(m, n)
    r = min(m, max(round(m * scale), min(m, KEEP_ASPECT_MIN_SIDE)))
    c = min(n, max(round(n * scale), min(n, KEEP_ASPECT_MIN_SIDE)))
    return r, c


def biopsy_indices(shape: tuple[int, int], limit: int, seed: int = 0,
                   keep_aspect: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """Sorted random row and column indices for a biopsy of at most ``limit x limit``.

    An axis that is kept whole is ``None``. Same ``(shape, limit, seed, keep_aspect)``, same
    indices, on any machine: the draw uses a private CPU generator, never the global RNG.
    See :func:`biopsy_shape` for ``keep_aspect``.
    """
    m, n = shape
    r, c = biopsy_shape((m, n), limit, keep_aspect)
    gen = _generator(seed)
    rows = torch.randperm(m, generator=gen)[:r].sort().values if m > r else None
    cols = torch.randperm(n, generator=gen)[:c].sort().values if n > c else None
    return rows, cols


def take_biopsy(W: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``W[rows][:, cols]`` with ``None`` meaning the whole axis."""
    if rows is not None:
        W = W.index_select(-2, rows.to(W.device))
    if cols is not None:
        W = W.index_select(-1, cols.to(W.device))
    return W


def biopsy(W: Tensor, limit: int = 512, seed: int = 0, keep_aspect: bool = False) -> Tensor:
    """The ASSR paper's Biopsy Mode: a seeded ``<= limit x limit`` submatrix of ``W``
    (``keep_aspect``: see :func:`biopsy_shape`)."""
    rows, cols = biopsy_indices(tuple(W.shape[-2:]), limit, seed, keep_aspect)
    return take_biopsy(W.detach(), rows, cols)


# ----------------------------------------------------------------------------------------------
# Warm-started power iteration


@dataclass
class PowerState:
    """Left/right singular vector estimates ``u`` (m) and ``v`` (n) carried between calls."""

    u: Tensor
    v: Tensor


def init_power_state(shape: tuple[int, ...], seed: int = 0, dtype=torch.float32,
                     device: torch.device | str = "cpu") -> PowerState:
    """Seeded random unit vectors (batched when ``shape`` has leading dimensions)."""
    gen = _generator(seed)
    *batch, m, n = shape
    u = torch.randn(*batch, m, generator=gen, dtype=dtype)
    v = torch.randn(*batch, n, generator=gen, dtype=dtype)
    return PowerState(
        (u / u.norm(dim=-1, keepdim=True)).to(device),
        (v / v.norm(dim=-1, keepdim=True)).to(device),
    )


@torch.no_grad()
def power_iteration(W: Tensor, state: PowerState | None = None, n_iter: int = 1,
                    seed: int = 0) -> tuple[Tensor, PowerState]:
    """Estimate ``sigma_max`` by ``n_iter`` steps of ``v <- W^T W v`` (normalized).

    Works on a single matrix or a stack ``(..., m, n)``. Returns ``(sigma, new_state)`` with
    ``sigma = u^T W v`` (a lower bound of ``sigma_max`` that converges to it at the rate
    ``(s_2 / s_1)^2`` per iteration). With the state from the previous call on a slightly
    changed ``W``, one iteration is typically enough to track ``sigma_max``.

    The returned state is always usable for the next call: where ``W`` (or one matrix of a
    stack) is zero or non-finite, the iteration would collapse the vectors to zero or NaN and
    every later warm start would stay stuck there (a zero-initialised layer would read
    ``sigma = 0`` forever); those entries keep their incoming vectors instead. (No host sync:
    the repair is a ``torch.where``. A hand-built all-zero incoming state is not repaired.)
    """
    Wc = as_compute_tensor(W)
    if state is None:
        state = init_power_state(tuple(Wc.shape), seed, Wc.dtype, Wc.device)
        n_iter = max(n_iter, 8)
    u0, v0 = state.u.to(Wc.dtype), state.v.to(Wc.dtype)
    u, v = u0, v0
    for _ in range(max(n_iter, 1)):
        u = torch.nn.functional.normalize((Wc @ v.unsqueeze(-1)).squeeze(-1), dim=-1, eps=1e-30)
        v = torch.nn.functional.normalize((Wc.mT @ u.unsqueeze(-1)).squeeze(-1), dim=-1,
                                          eps=1e-30)
    sigma = (u.unsqueeze(-2) @ Wc @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    bad = _unusable(u) | _unusable(v)
    return sigma, PowerState(torch.where(bad, u0, u), torch.where(bad, v0, v))


def _unusable(x: Tensor) -> Tensor:
    """``(..., 1)`` mask of vectors that cannot seed a power iteration: all zero or non-finite."""
    return ~torch.isfinite(x).all(dim=-1, keepdim=True) | (x.abs().amax(dim=-1, keepdim=True) == 0)


def sigma_from_state(W: Tensor, state: PowerState) -> Tensor:
    """Differentiable ``sigma_max ~= u^T W v`` with ``u, v`` held constant.

    Its gradient ``u v^T`` is the exact gradient of ``sigma_max`` when ``u, v`` are the top
    singular vectors (as in ``torch.nn.utils.parametrizations.spectral_norm``).
    """
    u, v = state.u.to(W.dtype), state.v.to(W.dtype)
    return (u.unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)


@torch.no_grad()
def sigma_min_power(W: Tensor, sigma_max: float, state: Tensor | None = None,
                    n_iter: int = 20, seed: int = 0) -> tuple[float, Tensor]:
    """Cheap estimate of ``sigma_min`` by power iteration on the shifted Gram matrix.

    With ``G`` the smaller Gram matrix (``W^T W`` if ``n <= m`` else ``W W^T``, size ``k``) and
    ``c = sigma_max^2``, the top eigenvector of ``c I - G`` is the bottom one of ``G``.
    Returns ``(estimate, x)``; the estimate is the Rayleigh quotient ``sqrt(x^T G x)``, an
    upper bound of ``sigma_min`` (so ``sigma_max / estimate`` is a lower bound of kappa).
    Convergence is slow when the bottom of the spectrum is clustered: pass ``x`` back in to
    warm-start. Cost ``O(m n)`` per iteration (the Gram matrix is never formed).
    """
    Wc = as_compute_tensor(W)
    m, n = Wc.shape
    gram_side = n if n <= m else m
    if state is None:
        state = torch.randn(gram_side, generator=_generator(seed), dtype=Wc.dtype)
    x = torch.nn.functional.normalize(state.to(Wc.dtype), dim=0, eps=1e-30)
    c = float(sigma_max) ** 2

    def gram(y: Tensor) -> Tensor:
        return Wc.T @ (Wc @ y) if n <= m else Wc @ (Wc.T @ y)

    for _ in range(n_iter):
        x = torch.nn.functional.normalize(c * x - gram(x), dim=0, eps=1e-30)
    rq = float(x @ gram(x))
    return math.sqrt(max(rq, 0.0)), x


# ----------------------------------------------------------------------------------------------
# Metrics by path


def spectral_metrics(W: Tensor, mode: Mode = "exact", limit: int = 512, seed: int = 0,
                     dtype: torch.dtype | None = None, alpha: bool | str = True,
                     keep_aspect: bool = False) -> SpectralMetrics:
    """All SVD-based sensors of one matrix by the chosen path.

    ``mode="exact"`` decomposes ``W``; ``mode="biopsy"`` decomposes a seeded
    ``<= limit x limit`` submatrix (ratios are relative to the submatrix's ``min(r, c)``;
    ``keep_aspect``: see :func:`biopsy_shape`).
    A non-finite matrix returns all-``nan`` metrics (count the entries with
    :func:`spectral_guard.sensors.count_nonfinite`). ``alpha``: ``True`` (or ``"csn"``) the
    power-law fit WeightWatcher reports, ``"hill_median"`` the faster median-xmin estimator,
    ``False`` none (see :func:`~spectral_guard.sensors.metrics_from_singular_values`).
    """
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    if mode == "biopsy":
        W = biopsy(W, limit, seed, keep_aspect)
    elif mode != "exact":
        raise ValueError(f"unknown mode {mode!r}: use 'exact' or 'biopsy'")
    Wc = as_compute_tensor(W, dtype)
    if Wc.numel() == 0:
        raise ValueError(f"empty matrix of shape {tuple(W.shape)}")
    if not bool(torch.isfinite(Wc).all()):
        return nonfinite_metrics(tuple(W.shape))
    s = torch.linalg.svdvals(Wc)
    return metrics_from_singular_values(s, tuple(W.shape), rank_rtol(tuple(W.shape), W.dtype),
                                        alpha=alpha)


def batched_singular_values(stack: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Singular values of every matrix in a ``(b, m, n)`` stack, in one batched SVD."""
    return torch.linalg.svdvals(as_compute_tensor(stack, dtype))


def spectral_metrics_batched(stack: Tensor | list[Tensor], mode: Mode = "exact",
                             limit: int = 512, seed: int = 0,
                             dtype: torch.dtype | None = None,
                             alpha: bool | str = True,
                             keep_aspect: bool = False) -> list[SpectralMetrics]:
    """:func:`spectral_metrics` for many same-shape matrices with one batched SVD.

    In biopsy mode every matrix gets the same seeded indices (one gather, one batched SVD).
    Matrices with non-finite entries get all-``nan`` metrics, as in the single-matrix path.
    """
    if isinstance(stack, (list, tuple)):
        stack = torch.stack([t.detach() for t in stack])
    if stack.dim() != 3:
        raise ValueError(f"expected a (b, m, n) stack, got shape {tuple(stack.shape)}")
    storage_dtype = stack.dtype
    if mode == "biopsy":
        rows, cols = biopsy_indices(tuple(stack.shape[-2:]), limit, seed, keep_aspect)
        stack = take_biopsy(stack.detach(), rows, cols)
    elif mode != "exact":
        raise ValueError(f"unknown mode {mode!r}: use 'exact' or 'biopsy'")
    Sc = as_compute_tensor(stack, dtype)
    finite = torch.isfinite(Sc).flatten(1).all(dim=1)
    safe = torch.where(finite[:, None, None], Sc, torch.zeros((), dtype=Sc.dtype))
    s = torch.linalg.svdvals(safe)
    shape = tuple(stack.shape[-2:])
    rtol = rank_rtol(shape, storage_dtype)
    return [metrics_from_singular_values(s[i], shape, rtol, alpha) if finite[i]
            else nonfinite_metrics(shape) for i in range(stack.shape[0])]
