"""The async check protocol (spectral_guard/guard/protocol.py) on CPU: one packed tensor per
device per step, the wait on the worker thread (never the training thread), pinned buffers
reused once the check that used them is consumed, results applied one step later."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch
from guard_models import byte_batches, seeded_model, synthetic_text

import spectral_guard
from spectral_guard.guard.protocol import AsyncChecks, HostBuffers, Packer


class _Event:
    """An event-like object recording which thread waited on it."""

    def __init__(self, log: list) -> None:
        self.log = log

    def synchronize(self) -> None:
        self.log.append(threading.get_ident())


def test_packer_slots_read_back_what_was_put_in_one_float_tensor():
    packer = Packer()
    a, b, c = torch.arange(6.0).view(2, 3), torch.tensor([7], dtype=torch.int64), \
        torch.tensor([0.5], dtype=torch.float64)
    slots = [packer.put(t) for t in (a, b, c)]
    checks = AsyncChecks()
    try:
        shipment, _ = checks.ship(packer)
        assert len(shipment.hosts) == 1 and shipment.events == {}      # CPU: no event
        flat = next(iter(shipment.hosts.values()))
        assert flat.dtype == torch.float64 and flat.numel() == 8       # promoted in the cat
        assert shipment.read(slots[0]).view(2, 3).tolist() == a.tolist()
        assert shipment.read(slots[1]).tolist() == [7.0]
        assert shipment.read(slots[2]).tolist() == [0.5]
    finally:
        checks.shutdown()


def test_freeze_keeps_what_was_read_before_an_in_place_write():
    W = torch.ones(2, 2)
    packer = Packer()
    slot = packer.put(W)              # a view of the weight
    packer.freeze()
    W.mul_(3.0)                       # the attention rescale writes weights after puts
    checks = AsyncChecks()
    shipment, _ = checks.ship(packer)
    checks.shutdown()
    assert shipment.read(slot).tolist() == [1.0] * 4


def test_host_buffers_are_reused_once_their_check_is_consumed():
    buffers = HostBuffers(pin=False)
    device = torch.device("cpu")
    first, entry = buffers.take(device, torch.float32, 10)
    busy: Future = Future()
    entry[1] = busy
    second, entry2 = buffers.take(device, torch.float32, 10)     # the first is still read
    assert second.data_ptr() != first.data_ptr() and buffers.allocations == 2
    busy.set_result(None)
    entry2[1] = busy
    third, _ = buffers.take(device, torch.float32, 8)            # consumed: reused
    assert third.data_ptr() in (first.data_ptr(), second.data_ptr())
    assert buffers.allocations == 2


def test_a_guard_waits_for_its_copies_on_the_worker_once_per_step_and_device():
    model = seeded_model(0, n_layers=2, d=32, seq=16)
    guard = spectral_guard.instrument(model, ratio=1.0)
    log: list = []
    guard.checks.shutdown()
    guard.checks = AsyncChecks(fence=lambda flat: _Event(log))
    guard.attention.checks = guard.checks
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = 4
    for x, y in byte_batches(synthetic_text(4000, 0), 4, 16, steps, seed=0):
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
    guard.state_dict()                                  # waits for the last one
    assert len(log) == steps                            # one event per step (one device)
    assert set(log) == {guard.checks.worker.thread_id}  # waited on the worker only
    assert threading.get_ident() not in log
    checked = guard.stats()["totals"]["checks"]
    assert checked == (steps - 1) * len(guard.layer_names)   # the first launch was replaced
