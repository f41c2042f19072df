"""A device that lags behind the CPU, emulated on CPU: does waiting for it cost the training
thread anything?

On a GPU the CPU runs ahead; the copy of a check's numbers lands only when the device has
caught up, most of a step later. The guard's worker waits for it. This script gives the guard
(``AsyncChecks(fence=...)``, :mod:`spectral_guard.guard.protocol`) an event-like object that
becomes ready only after the forward of the *next* step (``--land backward``: after its
backward, just before the step that collects it), set by the loop itself so that the lag
follows the step whatever the machine's load, with the real host half (``decompose``) behind
it, and times the training thread's step, arms interleaved:

* ``plain``: no guard;
* ``ready``: the guard with an event that is ready at once (the guard's own cost);
* ``blocking``: the guard's wait, ``synchronize()`` on a blocking event: the worker sleeps
  (``threading.Event.wait``, which releases the GIL as ``cudaEventSynchronize`` does);
* ``polling``: the wait of the guard before the protocol, ``while not event.query():
  time.sleep(5e-5)`` on the worker (about 5,000 wake-ups a second, each taking the GIL).

Arms run in blocks of ``--block`` consecutive steps, the block order rotating; an arm's last
event lands (untimed) before the next arm starts, so one arm's waiting never overlaps another
arm's steps.

The guard runs at its defaults (a check every step) unless ``--ratio``. Printed: the median
paired ratio of each arm's step time to ``plain``.

    python bench/lagging_device.py                  # 4 layers d=256, 40 steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from guard_models import byte_batches, seeded_model, synthetic_text  # noqa: E402

import spectral_guard  # noqa: E402
from spectral_guard.guard.protocol import AsyncChecks  # noqa: E402


class LaggingEvent:
    """Ready when the loop says so (:meth:`land`); ``synchronize()`` sleeps (no GIL held)."""

    def __init__(self, pending: list | None) -> None:
        self._ready = threading.Event()
        self.polls = 0
        if pending is None:
            self._ready.set()       # the "ready" arm: landed at once
        else:
            pending.append(self)

    def land(self) -> None:
        self._ready.set()

    def query(self) -> bool:
        self.polls += 1
        return self._ready.is_set()

    def synchronize(self) -> None:
        self._ready.wait()


class PollingEvent(LaggingEvent):
    """The wait before the protocol: poll every 50 us."""

    def synchronize(self) -> None:
        while not self.query():
            time.sleep(5e-5)


def land(arm: dict) -> None:
    for event in arm["pending"]:
        event.land()
    arm["pending"].clear()


def fence(kind: type, pending: list | None, made: list) -> object:
    def make(flat: torch.Tensor) -> LaggingEvent:
        made.append(kind(pending))
        return made[-1]

    return make


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--block", type=int, default=5, help="consecutive steps per arm")
    ap.add_argument("--land", choices=["forward", "backward"], default="forward",
                    help="the last step's copy lands after this step's forward / backward")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = seeded_model(0, n_layers=args.layers, d=args.d, heads=4, seq=args.seq)
    arms: dict[str, dict] = {}
    for name, kind, lags in (("plain", None, False), ("ready", LaggingEvent, False),
                             ("blocking", LaggingEvent, True), ("polling", PollingEvent, True)):
        model = copy.deepcopy(base)
        guard = None
        pending: list = []
        made: list = []
        if kind is not None:
            guard = spectral_guard.instrument(model, ratio=args.ratio)
            guard.checks.shutdown()
            guard.checks = AsyncChecks(fence=fence(kind, pending if lags else None, made))
            if guard.attention is not None:
                guard.attention.checks = guard.checks
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        arms[name] = {"model": model, "opt": opt, "guard": guard, "times": {},
                      "pending": pending, "made": made}
    data = list(byte_batches(synthetic_text(200_000, seed=0), args.batch, args.seq,
                             args.warmup + args.steps, seed=0))
    names, block = list(arms), args.block
    for first in range(0, len(data), block):   # blocks of steps per arm, arm order rotating
        r = first // block
        for name in names[r % len(names):] + names[:r % len(names)]:
            arm = arms[name]
            for step in range(first, min(first + block, len(data))):
                x, y = data[step]
                t0 = time.perf_counter()
                loss = arm["model"](x, y)["loss"]
                if args.land == "forward":
                    land(arm)   # the device caught up with the last step after this forward
                loss.backward()
                if args.land == "backward":
                    land(arm)   # ... or only after this backward, just before the collect
                arm["opt"].step()
                arm["opt"].zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                if step >= args.warmup:
                    arm["times"][step] = dt
            land(arm)   # untimed: no worker waits (or polls) while another arm runs
            time.sleep(0.01)
    plain = arms["plain"]["times"]
    print(f"# TinyGPT {args.layers} x {args.d}, batch {args.batch} x {args.seq}, guard "
          f"ratio={args.ratio} (a check every step), events land after the next step's "
          f"{args.land}; {args.steps} paired steps, {torch.get_num_threads()} threads")
    for name, arm in arms.items():
        ratio = statistics.median(t / plain[s] for s, t in arm["times"].items())
        polls = sum(e.polls for e in arm["made"]) / sum(arm["times"].values())
        print(f"{name:9s} median step {statistics.median(arm['times'].values()) * 1e3:8.1f} ms"
              f"  ratio to plain {ratio:.3f}  event polls {polls:7.0f}/s of its steps")


if __name__ == "__main__":
    main()
