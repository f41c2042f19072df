"""The guard on sharded weights (FSDP2 ``fully_shard``): sensors and penalties from local rows.

Under FSDP2 a guarded weight ``W`` (``m x n``) is, outside its module's forward, a DTensor
sharded on dim 0 over a 1-D mesh of ``R`` ranks: rank ``k`` holds the rows
``[o_k, o_k + m_k)`` as ``W_k`` (``torch.chunk`` layout: ``o_k = k ceil(m / R)``). ``W`` is never
gathered; every quantity the guard needs is a sum over ranks of local pieces, combined with
one all-reduce (sum) over the mesh's process group:

* **power iteration** (warm, ``v`` replicated): ``t = W v`` has its rows on their ranks, and
  ``W^T t = sum_k W_k^T t_k``. One all-reduce of ``m + n`` numbers per iteration carries both
  ``t`` (each rank writes its rows into a zero ``m``-vector: the sum assembles ``t`` exactly,
  ``x + 0 = x``) and ``W^T t``. Then, as in :func:`~spectral_guard.estimators.power_iteration`,
  ``u = t / ||t||``, ``v' = W^T u / ||W^T u||`` and ``sigma = u^T W v' = (W^T u) . v'``: no
  further communication. ``u`` and ``v`` stay replicated (the same on every rank, the same
  shapes as unsharded), so the guard's state is rank-independent.
* **biopsy**: the fixed seeded ``r x c`` biopsy ``B = W[rows][:, cols]`` has each of its rows on
  one rank. Each rank writes its rows into a zero ``r x c`` matrix and the all-reduce assembles
  ``B`` exactly. It rides in the last iteration's all-reduce, with the non-finite count
  ``sum_k #{non-finite entries of W_k}``. ``r c <= limit^2`` numbers in the weight's precision:
  the same count as the ``c x c`` Gram matrix ``G = sum_k B_k^T B_k`` (which would need float64
  to keep ``s_i^2`` accurate, so twice the bytes), and the worker then decomposes exactly the
  ``B`` of an unsharded run: every sensor (conditioning's singular vectors, the Fiedler rows)
  works unchanged.

Every rank runs the same layers at the same steps (the schedule is a pure function of the seed
and the step) and reads the same all-reduced numbers, so every rank reaches the same readings,
lambdas and treated set, and issues the same collectives in the same order.

**Penalties.** A loss term ``P(x)`` of global sums ``x = sum_k x_k`` (each ``x_k`` a
differentiable function of ``W_k``) is built from the surrogate
``x~ = x + (x_k - x_k.detach())`` with ``x = all_reduce(x_k.detach())``: ``P(x~)`` has the global
value ``P(x)`` on every rank, and its gradient w.r.t. ``W_k`` is ``dP/dx dx_k/dW_k``, exactly the
rows ``o_k .. o_k + m_k`` of the unsharded gradient. FSDP2 accumulates it into the sharded
parameter's ``.grad``, where the task loss's reduce-scatter (a mean over ranks) adds its part:
the sharded gradient is ``mean_k grad L_k + grad P``, as unsharded with the global batch.

* collapse: ``x = (a, b)`` with ``a_k = u_k^T W_k v`` (``u_k`` the local rows of ``u``) and
  ``b_k = ||W_k||_F^2``: ``P = a^2 / b = sigma^2 / ||W||_F^2``, gradient on the local rows
  ``2 sigma/F2 u_k v^T - sigma^2/F2^2 2 W_k``. One all-reduce of 2 numbers;
* l2: ``x = b``, ``P = ||W||_F^2`` (the same value on every rank). One all-reduce of 1 number;
* conditioning: ``x = B`` (the biopsy, from the local rows as above), ``P`` the log-space
  hinge of :func:`~spectral_guard.guard.penalties.condition_term`. One all-reduce of ``r c``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

try:  # a torch built without distributed support has no DTensor: nothing is ever sharded
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None  # type: ignore[assignment,misc]

from ..estimators import no_autocast
from .penalties import condition_term
from .state import GuardProbe, LayerState

Tensor = torch.Tensor
_EPS = 1e-30  # as F.normalize in estimators.power_iteration

ORDER = ("spectral_guard.instrument(model) must come before fully_shard(model): call "
         "instrument() on the unsharded model, then shard it")


def is_sharded(W: Any) -> bool:
    """True for a DTensor weight (a sharded parameter, e.g. under FSDP2)."""
    return DTensor is not None and isinstance(W, DTensor)


@dataclass(frozen=True)
class RowShard:
    """Which rows of ``W`` this rank holds, and the process group that holds the rest."""

    offset: int
    rows: int
    group: Any


def row_shard(W: DTensor) -> RowShard:
    """The local rows of a DTensor sharded on dim 0 over a 1-D mesh (FSDP2's default).

    Raises:
        ValueError: any other layout (a 2-D/HSDP mesh, ``Shard(1)``, replicated), in one line.
    """
    placements = tuple(W.placements)
    mesh = W.device_mesh
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard \
            or placements[0].dim != 0:
        raise ValueError(f"spectral_guard supports weights sharded on dim 0 over a 1-D mesh "
                         f"(FSDP2 fully_shard), got placements {placements} on a "
                         f"{mesh.ndim}-D mesh")
    m, world, rank = int(W.shape[0]), mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(m / world)
    offset = min(rank * chunk, m)
    rows = max(0, min(chunk, m - offset))
    local = int(W.to_local().shape[0])
    if local != rows:
        raise ValueError(f"spectral_guard: rank {rank} holds {local} rows of a {m}-row weight, "
                         f"expected {rows} (torch.chunk layout)")
    return RowShard(offset, rows, mesh.get_group())


def _compute(W: Tensor) -> Tensor:
    """16-bit weights are read in float32 (as :mod:`.penalties` and the sensors do)."""
    return W.float() if W.dtype in (torch.float16, torch.bfloat16) else W


def local_biopsy(probe: GuardProbe, W_local: Tensor, shard: RowShard) -> Tensor:
    """The full-size ``r x c`` biopsy with this rank's rows filled in and zeros elsewhere.

    ``sum_k local_biopsy_k = B`` exactly. Differentiable in ``W_local`` (a gather and a
    ``where``); no host read (the indices stay on the device).
    """
    m = int(probe.u.numel())
    rows = probe.rows if probe.rows.numel() else torch.arange(m, device=W_local.device)
    if probe.cols.numel():
        W_local = W_local.index_select(-1, probe.cols)
    if shard.rows == 0:
        return W_local.new_zeros(int(rows.numel()), int(W_local.shape[-1]))
    local = rows - shard.offset
    mine = (local >= 0) & (local < shard.rows)
    picked = W_local.index_select(0, local.clamp(0, shard.rows - 1))
    return torch.where(mine.unsqueeze(-1), picked, torch.zeros_like(picked))


def _all_reduce(x: Tensor, group: Any) -> Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


@dataclass
class _Layer:
    probe: GuardProbe
    W: Tensor  # local rows, compute dtype
    shard: RowShard
    v: Tensor
    count: bool = True
    u: Tensor | None = None
    wtu: Tensor | None = None


@torch.no_grad()
def measure(items: list[tuple[GuardProbe, DTensor, bool]], n_iter: int,
            pack_dtype: torch.dtype, biopsy: bool = True) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Warm power iteration on sharded weights, in place on each probe's ``u, v``; and, with
    ``biopsy``, the assembled biopsy and the non-finite count.

    ``items``: ``(probe, W, count)``; ``count`` asks for the number of non-finite entries of
    ``W`` (a pass over the local rows; ``-1`` without it, as in :func:`.worker.launch`).
    One all-reduce per iteration for all ``items`` sharing a process group (see the module
    docstring for what it carries). Returns per item ``(B, sigma, bad)``: ``B`` (``r x c``, or
    empty without ``biopsy``), ``sigma = u^T W v`` and the count, all in ``pack_dtype``,
    identical on every rank. Never reads a device tensor on the host.
    """
    layers = []
    for probe, W, count in items:
        Wl = _compute(W.detach().to_local())
        layers.append(_Layer(probe, Wl, row_shard(W), probe.v.to(Wl.dtype), count))
    out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(layers)
    for group_layers in _by_group(layers).values():
        with no_autocast(group_layers[0][1].W.device.type):
            _iterate(group_layers, max(n_iter, 1), pack_dtype, biopsy, out)
    return [o for o in out if o is not None]


def _by_group(layers: list[_Layer]) -> dict[int, list[tuple[int, _Layer]]]:
    groups: dict[int, list[tuple[int, _Layer]]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(id(layer.shard.group), []).append((i, layer))
    return groups


def _iterate(layers: list[tuple[int, _Layer]], n_iter: int, pack_dtype: torch.dtype,
             biopsy: bool, out: list) -> None:
    group = layers[0][1].shard.group
    for it in range(n_iter):
        last = it == n_iter - 1
        parts: list[Tensor] = []
        for _, L in layers:
            m, s = int(L.probe.u.numel()), L.shard
            t_local = L.W @ L.v
            t = t_local.new_zeros(m)
            t[s.offset:s.offset + s.rows] = t_local
            parts += [t.to(pack_dtype), (L.W.mT @ t_local).to(pack_dtype)]
            if last and biopsy:
                parts.append(local_biopsy(L.probe, L.W, s).reshape(-1).to(pack_dtype))
            if last:
                bad = (~torch.isfinite(L.W)).sum() if L.count else L.W.new_zeros(())
                parts.append(bad.reshape(1).to(pack_dtype))
        flat = _all_reduce(torch.cat(parts), group)
        at = 0
        for i, L in layers:
            m, n = int(L.probe.u.numel()), int(L.probe.v.numel())
            t, wt = flat[at:at + m].to(L.W.dtype), flat[at + m:at + m + n].to(L.W.dtype)
            at += m + n
            norm = t.norm().clamp_min(_EPS)
            L.u, L.wtu = t / norm, wt / norm  # u = W v / ||W v||, W^T u
            L.v = L.wtu / L.wtu.norm().clamp_min(_EPS)
            if not last:
                continue
            r, c = L.probe.biopsy_shape((m, n))
            B = flat[at:at + r * c].view(r, c) if biopsy else flat.new_zeros(0)
            at += r * c if biopsy else 0
            bad = flat[at] if L.count else torch.full_like(flat[at], -1)
            at += 1
            out[i] = (B, _finish(L), bad)


def _finish(L: _Layer) -> Tensor:
    """``sigma = (W^T u) . v``; store ``u, v`` (kept where unusable, as the unsharded path)."""
    assert L.u is not None and L.wtu is not None
    sigma = L.wtu @ L.v
    u0, v0 = L.probe.u, L.probe.v
    bad = _unusable(L.u) | _unusable(L.v)
    L.probe.u.copy_(torch.where(bad, u0, L.u.to(u0.dtype)))
    L.probe.v.copy_(torch.where(bad, v0, L.v.to(v0.dtype)))
    return sigma


def _unusable(x: Tensor) -> Tensor:
    return ~torch.isfinite(x).all() | (x.abs().amax() == 0)


def refresh(probe: GuardProbe, W: DTensor, n_iter: int) -> Tensor:
    """Warm power iteration on a sharded weight, in place; returns ``sigma`` (device)."""
    pack = torch.float64 if W.dtype == torch.float64 else torch.float32
    return measure([(probe, W, False)], n_iter, pack, biopsy=False)[0][1]


def _global(x_local: Tensor, group: Any) -> Tensor:
    """``x~ = sum_k x_k + (x_k - x_k.detach())``: global value, local exact gradient."""
    total = _all_reduce(x_local.detach().clone(), group)
    return total + (x_local - x_local.detach())


def collapse_term(W: DTensor, u: Tensor, v: Tensor) -> Tensor:
    """``sigma^2 / ||W||_F^2`` with ``sigma = u^T W v`` on a sharded ``W`` (see module
    docstring): the global value on every rank, the exact gradient on the local rows."""
    s = row_shard(W)
    Wl = _compute(W.to_local())
    a = u[s.offset:s.offset + s.rows].to(Wl.dtype) @ Wl @ v.to(Wl.dtype)
    x = _global(torch.stack([a, Wl.square().sum()]), s.group)
    return x[0].square() / x[1]


def l2_term(W: DTensor) -> Tensor:
    """``||W||_F^2`` of a sharded ``W``: global value, exact local gradient ``2 W_k``."""
    s = row_shard(W)
    return _global(_compute(W.to_local()).square().sum(), s.group)


def biopsy(probe: GuardProbe, W: DTensor) -> Tensor:
    """The biopsy ``B`` of a sharded ``W`` as a surrogate: its value is the whole ``B`` on
    every rank, its gradient reaches this rank's rows (one all-reduce of ``r x c``)."""
    s = row_shard(W)
    return _global(local_biopsy(probe, _compute(W.to_local()), s), s.group)


def term(W: DTensor, probe: GuardProbe, st: LayerState, actuator: str) -> Tensor | None:
    """The layer's penalty ``lambda P(W)`` on a sharded weight (what ``Guard._term`` builds for
    a plain one): the same terms, from local pieces and collectives."""
    lam_c, lam_k = st.term_lambdas(actuator)
    if actuator == "l2":
        return (lam_c + lam_k) * l2_term(W)
    out = lam_c * collapse_term(W, probe.u, probe.v) if lam_c > 0 else None
    if lam_k > 0 and st.cond_pairs > 1:
        t = lam_k * condition_term(biopsy(probe, W), probe.cond_u, probe.cond_v,
                                   st.log_kappa_max, st.cond_eps)
        out = t if out is None else out + t
    return out


def check_removable(model: torch.nn.Module) -> None:
    """Refuse ``guard.remove()`` on a model sharded by FSDP2 (one line): FSDP2 keeps un- and
    re-sharding the parametrization's ``original``, and its wrapper classes cannot lose the
    ``weight`` property, so removing would break the model."""
    fsdp = fsdp_module_type()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        raise ValueError("spectral_guard: guard.remove() is not supported after fully_shard "
                         "(FSDP2 manages the parametrized weights); remove the guard before "
                         "sharding, or keep it: model.state_dict() already has the plain keys")


def fsdp_module_type() -> type | None:
    """FSDP2's ``FSDPModule`` (``torch.distributed.fsdp`` from torch 2.6, ``_composable.fsdp``
    in 2.5), or ``None`` without distributed support."""
    for path in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            found = getattr(importlib.import_module(path), "FSDPModule", None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


def check_order(name: str, W: Any) -> None:
    """Refuse a weight that is sharded already when ``instrument()`` reaches it (one line)."""
    if is_sharded(W):
        raise ValueError(f"layer {name!r} has a sharded (DTensor) weight: {ORDER}")
