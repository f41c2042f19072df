"""The layer checks' two halves, run through the async protocol (:mod:`.protocol`).

1. :func:`launch`, on the training thread, only enqueues device work: per sampled layer one
   warm power-iteration step on ``W`` (updating the probe's ``u, v`` in place), the gather of
   the fixed biopsy, and a count of non-finite entries, put into the step's
   :class:`~.protocol.Packer`. No host read of a device tensor.
2. :func:`decompose`, the host half, on the worker thread once the copy has landed:
   decomposes each biopsy in float64 on the CPU, one LAPACK thread, and returns the absolute
   readings as :class:`Measurement` records.

The guard applies them at the next optimizer step (``s + 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..estimators import PowerState, no_autocast, power_iteration, singular_values_at
from ..sensors import fiedler_value
from . import sharded
from .check import Readings, measure
from .protocol import CheckWorker, Packer, Shipment, Slot
from .state import GuardProbe

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerEntry:
    """One layer to check: which, its probe and weight, and what the host half computes."""

    index: int
    generation: int
    probe: GuardProbe
    weight: Tensor
    vectors: bool = False      # singular vectors too (the conditioning term needs them)
    fiedler_rows: int = 0      # rows of the biopsy the Fiedler sensor reads (0: off)
    count: bool = False        # count the non-finite entries of W (layers already flagged)


@dataclass(frozen=True)
class Sample:
    """One layer in a launched check: where its numbers sit in the shipment."""

    index: int
    generation: int
    biopsy_shape: tuple[int, int]
    storage_dtype: torch.dtype
    vectors: bool
    fiedler_rows: int
    biopsy: Slot
    sigma: Slot
    nonfinite: Slot


@dataclass
class Measurement:
    """What the worker found for one layer (absolute readings; relative ones come later)."""

    index: int
    generation: int
    readings: Readings
    nonfinite_entries: int = 0
    svd: tuple[Tensor, Tensor, Tensor] | None = None
    error: str = ""


@torch.no_grad()
def refresh(probe: GuardProbe, W: Tensor, n_iter: int) -> Tensor:
    """Warm power iteration in place on ``probe.u, probe.v``; returns ``sigma`` (device).

    A sharded (DTensor) weight iterates on its local rows with one all-reduce per iteration
    (:func:`.sharded.refresh`)."""
    if sharded.is_sharded(W):
        return sharded.refresh(probe, W, n_iter)
    with no_autocast(W.device.type):
        sigma, state = power_iteration(W.detach(), PowerState(probe.u, probe.v), n_iter)
        probe.u.copy_(state.u)
        probe.v.copy_(state.v)
    return sigma


STACK_BYTES = 64 * 2**20
"""Same-shape weights are stacked into one batched power iteration (and one biopsy gather)
while the stack stays under this many bytes: on a GPU each op is a kernel launch, and the
stack's copy is cheaper than a launch per op per layer up to about this size."""

STACK_ON = frozenset({"cuda"})
"""Device types whose same-shape layers are stacked. Not the CPU by default: a batched matrix
product rounds differently from one product per layer, and CPU runs keep the numbers they had
(``bench/op_budget.py --stack`` counts the GPU path's ops on the CPU)."""


def _groups(items: list[tuple[GuardProbe, Tensor]]) -> list[list[int]]:
    """Indices of ``items`` in batches: same shape, dtype and device, unsharded, under
    :data:`STACK_BYTES` together; any other item alone."""
    groups: dict[tuple, list[int]] = {}
    out: list[list[int]] = []
    for i, (_, W) in enumerate(items):
        if sharded.is_sharded(W) or W.device.type not in STACK_ON:
            out.append([i])
            continue
        key = (tuple(W.shape), W.dtype, W.device)
        group = groups.setdefault(key, [])
        if group and (len(group) + 1) * W.numel() * max(W.element_size(), 4) > STACK_BYTES:
            out.append(list(group))
            group.clear()
        group.append(i)
    return out + [g for g in groups.values() if g]


@torch.no_grad()
def refresh_many(items: list[tuple[GuardProbe, Tensor]],
                 n_iter: int) -> list[tuple[list[int], Tensor, Tensor | None]]:
    """:func:`refresh` of many layers, same-shape ones as one batched power iteration.

    Returns per batch ``(indices into items, sigma (b,), stacked W or None)``."""
    out = []
    for idx in _groups(items):
        if len(idx) == 1:
            probe, W = items[idx[0]]
            out.append((idx, refresh(probe, W, n_iter).reshape(1), None))
            continue
        probes = [items[i][0] for i in idx]
        Ws = torch.stack([items[i][1].detach() for i in idx])
        with no_autocast(Ws.device.type):
            sigma, state = power_iteration(
                Ws, PowerState(torch.stack([p.u for p in probes]),
                               torch.stack([p.v for p in probes])), n_iter)
            torch._foreach_copy_([p.u for p in probes], list(state.u.unbind(0)))
            torch._foreach_copy_([p.v for p in probes], list(state.v.unbind(0)))
        out.append((idx, sigma, Ws))
    return out


def _biopsies(probes: list[GuardProbe], Ws: Tensor) -> Tensor:
    """The biopsies of a stack of same-shape weights, one gather per axis."""
    b = torch.arange(len(probes), device=Ws.device)
    if probes[0].rows.numel():
        Ws = Ws[b[:, None], torch.stack([p.rows for p in probes])]
    if probes[0].cols.numel():
        Ws = Ws.gather(-1, torch.stack([p.cols for p in probes])[:, None, :]
                       .expand(Ws.shape[0], Ws.shape[1], -1))
    return Ws


@torch.no_grad()
def launch(entries: list[LayerEntry], power_iters: int,
           packer: Packer) -> Callable[[Shipment], list[Measurement]] | None:
    """Put the device half of a check into ``packer`` (see module docstring); returns its host
    half (``None`` without entries). Never reads the device.

    Same-shape layers go as one batch (:func:`refresh_many`, one biopsy gather, one put per
    batch). Non-finite weights show in ``sigma`` and the biopsy at no extra cost; ``count``
    adds a pass over every entry of ``W`` to count them (the count follows the flag by one
    check). Sharded (DTensor) weights are measured together from their local rows, with one
    all-reduce per power iteration that also assembles their biopsies
    (:func:`.sharded.measure`).
    """
    if not entries:
        return None
    samples: list[Sample | None] = [None] * len(entries)
    pack_dtype = torch.float64 if any(e.weight.dtype == torch.float64 for e in entries) \
        else torch.float32
    shards = [i for i, e in enumerate(entries) if sharded.is_sharded(e.weight)]
    measured = sharded.measure([(entries[i].probe, entries[i].weight, entries[i].count)
                                for i in shards], power_iters, pack_dtype)
    batches: list[tuple[list[int], Tensor, Tensor, Tensor]] = [
        ([i], B, sigma.reshape(1), bad.reshape(1)) for i, (B, sigma, bad) in zip(
            shards, measured, strict=True)]
    plain = [i for i in range(len(entries)) if i not in set(shards)]
    for idx, sigma, Ws in refresh_many([(entries[i].probe, entries[i].weight) for i in plain],
                                       power_iters):
        group = [entries[plain[j]] for j in idx]
        if Ws is None:
            W = group[0].weight.detach()
            B = group[0].probe.biopsy(W)
            bad = (~torch.isfinite(W)).sum() if group[0].count else \
                torch.full((), -1, device=W.device)
            batches.append(([plain[idx[0]]], B, sigma, bad.reshape(1)))
            continue
        B = _biopsies([e.probe for e in group], Ws)
        if any(e.count for e in group):
            counted = torch.tensor([e.count for e in group], device=Ws.device)
            bad = torch.where(counted, (~torch.isfinite(Ws)).sum(dim=(1, 2)), -1)
        else:
            bad = torch.full((len(group),), -1, device=Ws.device)
        batches.append(([plain[j] for j in idx], B, sigma, bad))
    for idx, B, sigma, bad in batches:
        # no casts: the packer's one cat promotes exactly (biopsy, sigma, count -> fp32/fp64)
        b_slot, s_slot, n_slot = packer.put(B), packer.put(sigma), packer.put(bad)
        r, c = int(B.shape[-2]), int(B.shape[-1])
        for k, i in enumerate(idx):
            e = entries[i]
            samples[i] = Sample(e.index, e.generation, (r, c), e.weight.dtype, e.vectors,
                                e.fiedler_rows, b_slot.part(k, r * c), s_slot.part(k, 1),
                                n_slot.part(k, 1))
    done = [s for s in samples if s is not None]
    return lambda shipment: decompose(done, shipment)


def decompose(samples: list[Sample], shipment: Shipment) -> list[Measurement]:
    """The host half of a check (runs on the worker thread, after the copy landed)."""
    out = []
    for s in samples:
        try:
            out.append(_measure_one(shipment, s))
        except Exception as exc:  # e.g. LAPACK failing on a degenerate biopsy: mark, go on
            out.append(Measurement(s.index, s.generation, Readings(),
                                   error=f"{type(exc).__name__}: {exc}"))
    return out


def _measure_one(shipment: Shipment, s: Sample) -> Measurement:
    r, c = s.biopsy_shape
    B = shipment.read(s.biopsy).to(torch.float64).view(r, c)
    sigma, bad = float(shipment.read(s.sigma)[0]), int(shipment.read(s.nonfinite)[0])
    if bad > 0 or not math.isfinite(sigma) or not bool(torch.isfinite(B).all()):
        return Measurement(s.index, s.generation, Readings(),
                           nonfinite_entries=bad if bad > 0 else -1)
    svd = None
    if s.vectors:
        U, sv, Vh = torch.linalg.svd(B, full_matrices=False)
        svd = (U, sv, Vh)
    else:
        sv = singular_values_at(B, torch.float64, "gram")
    fiedler = fiedler_value(B[:s.fiedler_rows]) if s.fiedler_rows else math.nan
    readings = measure(sv, (r, c), s.storage_dtype, sigma, fiedler)
    return Measurement(s.index, s.generation, readings, svd=svd)


__all__ = ["CheckWorker", "LayerEntry", "Measurement", "Sample", "decompose", "launch",
           "refresh"]
