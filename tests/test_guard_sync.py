"""Zero host syncs from the guard on the training thread, as a CI property (issue 20).

Guarded training steps run inside :class:`sync_probe.SyncProbe`, which records every op that
would make the host wait for a CUDA device (``item``, ``nonzero``, ``masked_select``,
``equal``, ``unique``, boolean indexing, ``tolist``, ``cpu``, ... : the list and its sources
are in tests/sync_probe.py) run on the training thread, with the innermost ``spectral_guard``
frame on the stack. The guard's worker thread does host work by design and is not watched.
Only the public API is used (instrument, penalty, stats, metrics, step via the optimizer).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from guard_models import byte_batches, seeded_model, synthetic_text, thresholds
from sync_probe import SyncProbe

import spectral_guard

pytestmark = pytest.mark.usefixtures("single_thread")   # no OpenMP spin on a shared box

EVERY_CHECK_FIRES = thresholds(effective_rank_retention_min=2.0)   # retention < 2 always

CPU_ONLY = {
    ("msign.py", "msign_"): "the CPU branch's isfinite check (`W.device.type == 'cpu'`); the "
                            "device branch is Newton-Schulz with a torch.where "
                            "(test_the_matrix_signs_device_branch_reads_nothing)",
    ("msign.py", "polar_exact"): "the CPU branch's float64 SVD; the device branch has none",
}
"""Guard call sites that only a CPU model reaches, where reading the values costs no device
sync (the matrix sign, reached with the alarm raised). A new site found by these tests must be
fixed, or added here with the branch that makes it CPU-only (by ``(file, function)``, read off
the failure message)."""


def _key(site: str) -> tuple[str, str]:
    """``("msign.py", "msign_")`` from ``"msign.py:137 (msign_)"``."""
    where, func = site.split(" (")
    return Path(where.split(":")[0]).name, func.rstrip(")")


def guard_syncs(probe: SyncProbe, allowed: dict | None = None) -> list[str]:
    return [str(r) for r in probe.from_package() if _key(r.site) not in (allowed or {})]


def assert_no_guard_syncs(probe: SyncProbe, allowed: dict | None = None) -> None:
    found = guard_syncs(probe, allowed)
    assert not found, ("host syncs from spectral_guard on the training thread (fix them, or add "
                       f"a CPU-only branch to CPU_ONLY with its reason): {sorted(set(found))}")


def _model():
    return seeded_model(0, n_layers=1, d=32, heads=2, seq=16)


BATCHES = list(byte_batches(synthetic_text(3000, 0), 2, 16, 8, seed=0))


def _train(model, guard, steps: int, accumulate: int = 1, explicit: bool = False,
           log: bool = False, probe: SyncProbe | None = None) -> SyncProbe:
    """``steps`` optimizer steps of AdamW, ``accumulate`` micro-batches each, inside a probe;
    ``explicit``: the loss adds ``guard.penalty()`` itself; ``log``: ``stats()`` after each."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = probe or SyncProbe()
    batches = iter(BATCHES * 4)
    with probe:
        for _ in range(steps):
            for _ in range(accumulate):
                x, y = next(batches)
                loss = model(x, y)["loss"]
                if explicit:
                    loss = loss + guard.penalty()
                (loss / accumulate).backward()
            opt.step()
            opt.zero_grad()
            if log:
                guard.stats()
    return probe


def test_no_sync_at_defaults():
    """Attention guard on (its host half runs on the worker since the async-check protocol)."""
    model = _model()
    guard = spectral_guard.instrument(model)
    probe = _train(model, guard, 4)
    assert guard.stats()["totals"]["checks"] >= 3        # checks landed during the probe
    assert guard.metrics()["attention_pairs"] > 0
    assert_no_guard_syncs(probe)


def test_no_sync_at_ratio_one_every_layer_treated_with_explicit_penalty():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=EVERY_CHECK_FIRES,
                                      auto_loss=False)
    probe = _train(model, guard, 4, explicit=True)
    totals = guard.stats()["totals"]
    assert totals["treated_layers"] == totals["layers"] and totals["checks"] >= 3 * totals[
        "layers"]
    assert guard.metrics()["penalty"] > 0                 # the terms were built (read after)
    assert_no_guard_syncs(probe)


def test_no_sync_under_gradient_accumulation():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=EVERY_CHECK_FIRES)
    probe = _train(model, guard, 3, accumulate=3)
    assert guard.stats()["totals"]["treated_layers"] == len(guard.layer_names)
    assert_no_guard_syncs(probe)


def test_no_sync_with_every_block_treated():
    """The block hooks build their terms on the forward's activations; lambdas stay host."""
    model = _model()
    guard = spectral_guard.instrument(model, block_max_update=1e-6)   # every block over
    probe = _train(model, guard, 4)
    assert guard.metrics()["block_treated"] == guard.metrics()["blocks"] > 0
    assert guard.metrics()["penalty"] > 0
    assert_no_guard_syncs(probe)


def test_no_sync_with_the_attention_rescale():
    model = _model()
    guard = spectral_guard.instrument(model, attention_actuator="rescale",
                                      attention_max_scale=1e-6)   # every pair over its target
    probe = _train(model, guard, 4)
    assert guard.metrics()["attention_rescales"] > 0
    assert_no_guard_syncs(probe)


def test_no_sync_with_the_alarm_raised_matrix_sign_and_backoff():
    model = _model()
    guard = spectral_guard.instrument(model, msign_every=2, attention_max_scale=1e-6)
    probe = _train(model, guard, 4)
    m = guard.metrics()
    assert m["msigns"] > 0 and m["lr_scale"] < 1.0        # signed and backed off in the probe
    assert_no_guard_syncs(probe, CPU_ONLY)


def test_the_matrix_signs_device_branch_reads_nothing():
    """What CPU_ONLY allows is the CPU branch: on any other device (meta here: shapes only)
    the sign is computed and applied without a host read."""
    from spectral_guard.guard.msign import msign_

    W = torch.empty(48, 32, device="meta")
    with SyncProbe() as probe:
        msign_(W)
    assert probe.records == []
    with SyncProbe() as probe:
        msign_(torch.randn(48, 32, generator=torch.Generator().manual_seed(0)))
    assert {_key(r.site) for r in probe.from_package()} <= set(CPU_ONLY)
    assert probe.from_package()                   # ... which the probe does see on the CPU


def test_no_sync_from_penalty_and_stats_in_a_logging_loop():
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=EVERY_CHECK_FIRES,
                                      auto_loss=False)
    probe = _train(model, guard, 4, explicit=True, log=True)
    assert guard.stats()["totals"]["treated_layers"] > 0
    assert_no_guard_syncs(probe)


def test_no_sync_from_metrics_in_a_logging_loop():
    """``metrics()["penalty"]`` is the value the step's packed copy carried to the host (one
    step behind, ``penalty_step``), not a read of the device tensor."""
    model = _model()
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=EVERY_CHECK_FIRES)
    probe = SyncProbe()
    _train(model, guard, 3)
    with probe:
        for _ in range(3):
            guard.metrics()
    m = guard.metrics()
    assert m["penalty"] > 0 and m["penalty_step"] == guard.global_step - 1
    assert_no_guard_syncs(probe)


# -- the detector itself ---------------------------------------------------------------------


def test_the_probe_attributes_an_item_injected_into_the_guards_step(monkeypatch):
    """An ``.item()`` in what the optimizer-step hook calls (``guard.step``) is found, counted
    against the guard, and fails the assertion the tests above make."""
    model = _model()
    guard = spectral_guard.instrument(model)
    real_step = guard.step

    def step_with_item():
        real_step()
        torch.ones(()).item()

    monkeypatch.setattr(guard, "step", step_with_item)
    probe = _train(model, guard, 2)
    injected = [r for r in probe.from_package() if r.caller.startswith(Path(__file__).name)]
    assert {r.op for r in injected} == {"Tensor.item", "aten._local_scalar_dense"}
    assert len(injected) == 4                       # two steps, seen at both levels
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        assert_no_guard_syncs(probe)


def test_the_probe_sees_the_users_syncs_but_does_not_blame_the_guard():
    model = _model()
    guard = spectral_guard.instrument(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = BATCHES[0]
    with SyncProbe() as probe:
        loss = model(x, y)["loss"]
        loss.backward()
        opt.step()
        print(f"{loss.item():.3f}")               # a user's logging line
    user = [r for r in probe.records if r.site is None]
    assert {r.op for r in user} >= {"Tensor.item", "aten._local_scalar_dense"}
    assert all(r.caller.startswith(Path(__file__).name) for r in user)
    assert guard.global_step == 1


def test_the_probe_knows_the_sync_ops_and_ignores_other_threads():
    x = torch.tensor([0.0, 1.0, 2.0, 0.0])
    mask = x > 0
    cases = {
        "aten.nonzero": lambda: x.nonzero(),
        "aten.masked_select": lambda: x.masked_select(mask),
        "aten.index with a boolean mask": lambda: x[mask],
        "aten.index_put_ with a boolean mask": lambda: x.clone().index_put_((mask,),
                                                                             torch.tensor(1.0)),
        "aten.equal": lambda: torch.equal(x, x),
        "aten._unique2": lambda: torch.unique(x),
        "aten.repeat_interleave without output_size": lambda: torch.repeat_interleave(
            x, torch.tensor([1, 2, 1, 1])),
        "aten._linalg_eigh": lambda: torch.linalg.eigvalsh(torch.eye(2)),
        "aten._linalg_svd": lambda: torch.linalg.svdvals(torch.eye(2)),
        "aten._local_scalar_dense": lambda: float(x.sum()),
        "Tensor.__bool__": lambda: bool(x.sum()),
        "Tensor.__int__": lambda: int(x.sum()),
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.cpu": lambda: x.cpu(),
        "Tensor.numpy": lambda: x.numpy(),
    }
    for op, run in cases.items():
        with SyncProbe() as probe:
            run()
        assert op in {r.op for r in probe.records}, op
    quiet = [lambda: x * 2, lambda: x.masked_fill(mask, 0.0), lambda: torch.where(mask, x, 0),
             lambda: x.nonzero_static(size=4), lambda: x.max(),
             lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 1, 1]), output_size=5),
             lambda: x.to(torch.float64)]
    for run in quiet:
        with SyncProbe() as probe:
            run()
        assert probe.records == [], probe.records
    with SyncProbe() as probe:
        worker = threading.Thread(target=lambda: float(torch.ones(()).sum()))
        worker.start()
        worker.join()
    assert probe.records == []                    # another thread's host work is its own
