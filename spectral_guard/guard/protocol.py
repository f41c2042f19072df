"""The async check protocol: device work at the optimizer step, the host half on a worker.

Every check the guard makes (the layer checks of :mod:`.measure`, the attention checks of
:mod:`.attention`) follows one cycle, at the advance of the clock to step ``s``:

1. **collect** (training thread): take the shipment launched at ``s - 1`` and its host
   results (``Future.result()``: free when the worker is done, which it is in a normal loop);
   each component applies its part. A fixed one-step lag: runs are deterministic and
   resumable.
2. **launch** (training thread, device work only): each component puts the tensors its host
   half needs into a :class:`Packer` and names its host half (a function of the
   :class:`Shipment`).
3. **ship** (training thread): per device, one ``torch.cat`` of everything put, one
   ``non_blocking`` copy into a reused pinned host buffer (:class:`HostBuffers`), and one
   blocking CUDA event recorded on *that device's* current stream
   (``torch.cuda.current_stream(flat.device)``: the stream the copy was enqueued on, also for
   a model on ``cuda:1`` without ``set_device`` or split over devices).
4. **host half** (:class:`CheckWorker` thread): wait for each event with
   ``Event.synchronize()`` (a blocking event: the thread sleeps and releases the GIL; no
   polling), then run each component's host function on its slice of the host buffer.

Nothing on the training thread waits for the device or reads a device tensor. On CPU the
packed tensor *is* the host copy: no pinned memory, no events.

Records: :class:`Slot` (where a put tensor lands), :class:`Shipment` (per device: host
tensor and event), :class:`InFlight` (the step and the future of its host results).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Tensor = torch.Tensor
HostFn = Callable[["Shipment"], Any]
Fence = Callable[[Tensor], Any]


@dataclass(frozen=True)
class Slot:
    """Where a tensor put into a :class:`Packer` lands: its device's flat buffer, an offset
    and its (flattened) length."""

    device: torch.device
    offset: int
    numel: int

    def part(self, k: int, numel: int) -> Slot:
        """The ``k``-th of consecutive ``numel``-long pieces of this slot (a stacked put)."""
        return Slot(self.device, self.offset + k * numel, numel)


class Packer:
    """One step's device half: flattened tensors collected per device (no copy yet).

    A component that writes weights in place after putting views of them calls
    :meth:`freeze` first (the attention rescale does), so the shipment holds what was read.
    """

    def __init__(self) -> None:
        self.parts: dict[torch.device, list[Tensor]] = {}
        self.sizes: dict[torch.device, int] = {}
        self._frozen: set[torch.device] = set()

    def put(self, t: Tensor) -> Slot:
        flat = t.reshape(-1)
        device = flat.device
        offset = self.sizes.get(device, 0)
        self.parts.setdefault(device, []).append(flat)
        self.sizes[device] = offset + int(flat.numel())
        self._frozen.discard(device)
        return Slot(device, offset, int(flat.numel()))

    def freeze(self) -> None:
        """Materialize what was put so far (one ``cat`` per device)."""
        for device in self.parts:
            self.parts[device] = [self.flat(device)]
            self._frozen.add(device)

    def flat(self, device: torch.device) -> Tensor:
        """Everything put on ``device`` as one new tensor, in float32, or float64 when a part
        is (type promotion inside ``cat``: no per-part cast)."""
        parts = self.parts[device]
        if device in self._frozen:
            return parts[0]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()

    def __bool__(self) -> bool:
        return bool(self.parts)


class HostBuffers:
    """Pinned host buffers reused from step to step, per device and dtype.

    A buffer is handed out again once the shipment that last used it is consumed (its future
    done); otherwise a new one is allocated (e.g. a check dropped by a state load while the
    worker still reads it).
    """

    def __init__(self, pin: bool = True) -> None:
        self._pool: dict[tuple[torch.device, torch.dtype], list[list[Any]]] = {}
        self.pin = pin   # False only to test the reuse rule without a CUDA device
        self.allocations = 0

    def take(self, device: torch.device, dtype: torch.dtype, numel: int) -> tuple[Tensor, list]:
        entries = self._pool.setdefault((device, dtype), [])
        for entry in entries:
            buf, busy = entry
            if (busy is None or busy.done()) and buf.numel() >= numel:
                return buf[:numel], entry
        buf = torch.empty(max(numel, 2 * max((e[0].numel() for e in entries), default=0)),
                          dtype=dtype, pin_memory=self.pin)
        self.allocations += 1
        entry = [buf, None]
        entries[:] = [e for e in entries if e[1] is not None and not e[1].done()] + [entry]
        return buf[:numel], entry


def cuda_fence(flat: Tensor) -> Any:
    """A blocking event recorded on the stream of ``flat``'s own device."""
    event = torch.cuda.Event(blocking=True)
    event.record(torch.cuda.current_stream(flat.device))
    return event


@dataclass
class Shipment:
    """What the worker receives: per device, the host tensor and the event guarding it."""

    hosts: dict[torch.device, Tensor] = field(default_factory=dict)
    events: dict[torch.device, Any] = field(default_factory=dict)

    def wait(self) -> None:
        """Block until every copy has landed (worker thread; releases the GIL)."""
        for event in self.events.values():
            event.synchronize()

    def read(self, slot: Slot) -> Tensor:
        return self.hosts[slot.device][slot.offset:slot.offset + slot.numel]


@dataclass
class InFlight:
    """A launched check: the step it measured and the future of its host results
    (``{component: result}``)."""

    step: int
    future: Future

    def result(self) -> dict[str, Any]:
        return self.future.result()


def done(step: int, result: dict[str, Any]) -> InFlight:
    """An in-flight check already finished (a restored or copied one)."""
    future: Future = Future()
    future.set_result(result)
    return InFlight(step, future)


class CheckWorker:
    """One thread for the host halves, with one intra-op thread.

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

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _single_threaded() -> int:
    torch.set_num_threads(1)
    return threading.get_ident()


class Component(Protocol):
    """A part of the guard that checks through the protocol (layers, attention pairs) or acts
    between the applies (the matrix sign): ``launch`` returns its host half or ``None``."""

    name: str

    def apply(self, result: Any | None, step: int) -> None: ...

    def launch(self, step: int, packer: Packer) -> HostFn | None: ...


def _host_half(shipment: Shipment, host_fns: dict[str, HostFn]) -> dict[str, Any]:
    shipment.wait()
    return {name: fn(shipment) for name, fn in host_fns.items()}


class AsyncChecks:
    """The cycle of the module docstring for one guard: worker, host buffers, the check in
    flight.

    Args:
        fence: makes the event for a packed CUDA tensor (default :func:`cuda_fence`); a
            benchmark can pass an event-like object with ``synchronize()`` to emulate a device
            (``bench/lagging_device.py``). ``None`` is never fenced on CPU.
    """

    def __init__(self, fence: Fence | None = None) -> None:
        self.worker = CheckWorker()
        self.buffers = HostBuffers()
        self.fence: Fence | None = fence
        self.inflight: InFlight | None = None

    def ship(self, packer: Packer) -> tuple[Shipment, list]:
        """Step 3 of the cycle: one copy and one event per device."""
        shipment, used = Shipment(), []
        for device in packer.parts:
            flat = packer.flat(device)
            if device.type == "cuda":
                host, entry = self.buffers.take(device, flat.dtype, int(flat.numel()))
                host.copy_(flat, non_blocking=True)
                shipment.events[device] = (self.fence or cuda_fence)(flat)
                used.append(entry)
            else:
                host = flat
                if self.fence is not None:
                    shipment.events[device] = self.fence(flat)
            shipment.hosts[device] = host
        return shipment, used

    def launch(self, step: int, packer: Packer, host_fns: dict[str, HostFn]) -> None:
        """Ship ``packer`` and hand the host functions to the worker (nothing to do when no
        component has host work)."""
        if not host_fns:
            self.inflight = None
            return
        shipment, used = self.ship(packer)
        future = self.worker.submit(_host_half, shipment, host_fns)
        for entry in used:
            entry[1] = future
        self.inflight = InFlight(step, future)

    def advance(self, step: int, components: list[Component], apply: bool = True) -> None:
        """One cycle at the advance to ``step``: each component applies its result of the
        check in flight (launched at the previous step; ``None`` when it had none), in order;
        then each launches into one packer, shipped once."""
        inflight = self.collect()
        if apply:
            results = {} if inflight is None else inflight.result()
            launched = -1 if inflight is None else inflight.step
            for c in components:
                c.apply(results.get(c.name), launched)
        packer = Packer()
        hosts = {c.name: c.launch(step, packer) for c in components}
        self.launch(step, packer, {k: v for k, v in hosts.items() if v is not None})

    def collect(self) -> InFlight | None:
        """Step 1: the check in flight (its results are ``.result()``), now taken."""
        inflight, self.inflight = self.inflight, None
        return inflight

    def now(self, packer: Packer, host_fns: dict[str, HostFn]) -> dict[str, Any]:
        """Ship and wait (instrumentation and loading: not a training step)."""
        if not host_fns:
            return {}
        shipment, _ = self.ship(packer)
        return self.worker.submit(_host_half, shipment, host_fns).result()

    def pending(self, name: str) -> tuple[int, Any] | None:
        """``(step, result)`` of component ``name`` in the check in flight, waiting for it
        (for a state dict: not a training-step call); ``None`` when nothing is in flight."""
        if self.inflight is None or name not in self.inflight.result():
            return None
        return self.inflight.step, self.inflight.result()[name]

    def restore(self, step: int, name: str, result: Any) -> None:
        """Put back component ``name``'s result of a saved check launched at ``step`` (joins
        the other components' results of that check)."""
        results = {} if self.inflight is None or self.inflight.step != step else \
            dict(self.inflight.result())
        self.inflight = done(step, {**results, name: result})

    def shutdown(self) -> None:
        self.inflight = None
        self.worker.shutdown()

    def __deepcopy__(self, memo: dict) -> AsyncChecks:
        """A fresh worker for a copied guard, with the check in flight as a finished one."""
        import copy

        new = AsyncChecks(self.fence)
        memo[id(self)] = new
        if self.inflight is not None:
            new.inflight = done(self.inflight.step,
                                copy.deepcopy(self.inflight.result(), memo))
        return new
