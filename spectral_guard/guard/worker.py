"""Checks off the critical path: device work that never waits, decompositions on a host thread.

A check of the sampled layers at optimizer step ``s`` has two halves.

1. :func:`launch`, on the training thread, only enqueues device work: per layer one warm
   power-iteration step on ``W`` (updating the probe's ``u, v`` in place), the gather of the
   fixed biopsy, and a count of non-finite entries; everything is packed into one buffer and
   copied to (pinned) host memory with ``non_blocking=True`` behind a CUDA event. No host read
   of a device tensor: the training stream is never synchronized.
2. :func:`decompose`, on the :class:`CheckWorker` thread, waits for that event (polling it, so
   no CUDA synchronization call is made), then decomposes each biopsy in float64 on the CPU,
   one LAPACK thread, and returns the absolute readings.

The guard applies the result at the next optimizer step (``s + 1``), waiting for the worker
there, which costs nothing once it is done. The lag is fixed, so runs are deterministic and
resumable. On CPU the same code path runs: the copy is a plain copy and there is no event.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..estimators import PowerState, no_autocast, power_iteration, singular_values_at
from ..sensors import fiedler_value
from . import sharded
from .check import Readings, measure
from .state import GuardProbe

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sample:
    """One layer in a launched check: where its numbers sit in the packed buffer."""

    index: int
    generation: int
    biopsy_shape: tuple[int, int]
    storage_dtype: torch.dtype
    vectors: bool
    fiedler_rows: int
    offset: int

    @property
    def size(self) -> int:
        return self.biopsy_shape[0] * self.biopsy_shape[1] + 2  # biopsy, sigma, non-finite


@dataclass
class Measurement:
    """What the worker found for one layer (absolute readings; relative ones come later)."""

    index: int
    generation: int
    readings: Readings
    nonfinite_entries: int = 0
    svd: tuple[Tensor, Tensor, Tensor] | None = None
    error: str = ""


@dataclass
class Packet:
    """A launched check: the host copy of the packed buffer and the event that guards it."""

    samples: list[Sample]
    host: Tensor
    event: torch.cuda.Event | None = None


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
def launch(entries: list[tuple[int, int, GuardProbe, Tensor, bool, int, bool]],
           power_iters: int) -> Packet:
    """Enqueue the device half of a check (see module docstring); never reads the device.

    ``entries``: ``(index, generation, probe, weight, vectors, fiedler_rows, count)`` per
    layer. Non-finite weights show in ``sigma`` and the biopsy at no extra cost; ``count``
    adds a pass over every entry of ``W`` to count them (done for layers already flagged, so
    the count follows the flag by one check). Sharded (DTensor) weights are measured
    together from their local rows, with one all-reduce per power iteration that also
    assembles their biopsies (:func:`.sharded.measure`); their packet entries are the same.
    """
    samples: list[Sample] = []
    parts: list[Tensor] = []
    offset = 0
    pack_dtype = torch.float64 if any(e[3].dtype == torch.float64 for e in entries) \
        else torch.float32
    device = entries[0][3].device if entries else torch.device("cpu")
    on_shards = iter(sharded.measure([(e[2], e[3], e[6]) for e in entries
                                      if sharded.is_sharded(e[3])], power_iters, pack_dtype))
    for index, generation, probe, W, vectors, fiedler_rows, count in entries:
        W = W.detach()
        if sharded.is_sharded(W):
            B, sigma, bad = next(on_shards)
        else:
            sigma = refresh(probe, W, power_iters)
            B = probe.biopsy(W)
            bad = (~torch.isfinite(W)).sum() if count else torch.full((), -1, device=W.device)
        parts += [B.reshape(-1).to(pack_dtype), sigma.reshape(1).to(pack_dtype),
                  bad.reshape(1).to(pack_dtype)]
        sample = Sample(index, generation, (int(B.shape[0]), int(B.shape[1])), W.dtype,
                        vectors, fiedler_rows, offset)
        samples.append(sample)
        offset += sample.size
    if not parts:
        return Packet([], torch.zeros(0))
    flat = torch.cat([p.to(device) for p in parts])
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Packet(samples, host, event)
    return Packet(samples, flat.cpu())


def decompose(packet: Packet) -> list[Measurement]:
    """The host half of a check (runs on the worker thread)."""
    if packet.event is not None:
        while not packet.event.query():  # polling: no synchronizing CUDA call
            time.sleep(5e-5)
    out = []
    for s in packet.samples:
        try:
            out.append(_measure_one(packet.host, s))
        except Exception as exc:  # e.g. LAPACK failing on a degenerate biopsy: mark, go on
            out.append(Measurement(s.index, s.generation, Readings(),
                                   error=f"{type(exc).__name__}: {exc}"))
    return out


def _measure_one(flat: Tensor, s: Sample) -> Measurement:
    r, c = s.biopsy_shape
    chunk = flat[s.offset:s.offset + s.size].to(torch.float64)
    B, sigma, bad = chunk[:r * c].view(r, c), float(chunk[-2]), int(chunk[-1])
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


class CheckWorker:
    """One daemon-like thread that decomposes launched checks, with one intra-op thread.

    ``torch.set_num_threads`` is process-wide in its bookkeeping, but the OpenMP and MKL
    thread counts it sets are per calling thread. The worker sets 1 for itself; the creating
    thread then sets its own count back, so training keeps its threads and the worker's small
    LAPACK calls never wait for an OpenMP team.
    """

    def __init__(self) -> None:
        before = torch.get_num_threads()  # also initializes this thread's own count
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectral_guard")
        self.thread_id = self._pool.submit(_single_threaded).result()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

    def submit(self, packet: Packet) -> Future:
        return self._pool.submit(decompose, packet)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _single_threaded() -> int:
    torch.set_num_threads(1)
    return threading.get_ident()


def done(result: list[Measurement]) -> Future:
    """A finished future holding ``result`` (a restored in-flight check)."""
    future: Future = Future()
    future.set_result(result)
    return future
