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


@torch.no_grad()
def launch(entries: list[LayerEntry], power_iters: int,
           packer: Packer) -> Callable[[Shipment], list[Measurement]] | None:
    """Put the device half of a check into ``packer`` (see module docstring); returns its host
    half (``None`` without entries). Never reads the device.

    Non-finite weights show in ``sigma`` and the biopsy at no extra cost; ``count`` adds a
    pass over every entry of ``W`` to count them (the count follows the flag by one check).
    Sharded (DTensor) weights are measured together from their local rows, with one
    all-reduce per power iteration that also assembles their biopsies (:func:`.sharded.measure`).
    """
    if not entries:
        return None
    samples: list[Sample] = []
    pack_dtype = torch.float64 if any(e.weight.dtype == torch.float64 for e in entries) \
        else torch.float32
    on_shards = iter(sharded.measure([(e.probe, e.weight, e.count) for e in entries
                                      if sharded.is_sharded(e.weight)], power_iters, pack_dtype))
    for e in entries:
        W = e.weight.detach()
        if sharded.is_sharded(W):
            B, sigma, bad = next(on_shards)
        else:
            sigma = refresh(e.probe, W, power_iters)
            B = e.probe.biopsy(W)
            bad = (~torch.isfinite(W)).sum() if e.count else torch.full((), -1, device=W.device)
        # no casts: the packer's one cat promotes exactly (biopsy, sigma, count -> fp32/fp64)
        samples.append(Sample(e.index, e.generation, (int(B.shape[0]), int(B.shape[1])),
                              W.dtype, e.vectors, e.fiedler_rows, packer.put(B),
                              packer.put(sigma), packer.put(bad)))
    return lambda shipment: decompose(samples, shipment)


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
