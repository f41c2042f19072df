"""GPU paths: no host synchronization in guarded steps (nor a wait on the training thread),
fp16 autocast with GradScaler, bf16 autocast reading as fp32, and models on a non-current device
or spread over two devices reading as their CPU twin. Skipped without CUDA (CI has none; the
two-device tests without two GPUs); run on a GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
from guard_models import byte_batches, seeded_model, synthetic_text, thresholds
from sync_probe import CudaWaitSpy, SyncProbe

import spectral_guard

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _batches(n: int, device: str):
    return [(x.to(device), y.to(device))
            for x, y in byte_batches(synthetic_text(8000), 8, 64, n, seed=0)]


class _OnDevice(torch.nn.Module):
    """TinyGPT whose position ids are made on the input's device."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.inner = seeded_model(seed, n_layers=2, d=64, seq=64)

    def forward(self, idx, targets=None):
        inner = self.inner
        x = inner.wte(idx) + inner.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in inner.blocks:
            x = block(x)
        logits = inner.lm_head(inner.ln_f(x))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 targets.flatten())
        return {"logits": logits, "loss": loss}


@cuda
def test_twenty_guarded_steps_make_no_host_sync():
    model = _OnDevice().cuda()
    guard = spectral_guard.instrument(model, ratio=0.5,
                                      thresholds=thresholds(effective_rank_retention_min=2.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    batches = _batches(23, "cuda")
    for x, y in batches[:3]:  # warm-up: allocator, lazy CUDA init, first pinned buffers
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with CudaWaitSpy() as waits, SyncProbe() as probe:
            for x, y in batches[3:]:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, y)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                guard.stats()   # a logging loop's read: host values only
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert waits.calls == []   # Event/Stream.synchronize: invisible to the sync-debug mode
    assert [str(r) for r in probe.from_package()] == []
    totals = guard.stats()["totals"]
    assert totals["checks"] > 0 and totals["treated_layers"] > 0


@cuda
def test_fp16_autocast_with_grad_scaler():
    model = _OnDevice().cuda()
    guard = spectral_guard.instrument(model, ratio=1.0,
                                      thresholds=thresholds(effective_rank_retention_min=2.0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    for x, y in _batches(4, "cuda"):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x, y)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    stats = guard.stats()
    assert stats["totals"]["treated_layers"] > 0 and stats["totals"]["failed_checks"] == 0
    assert all(r["sensors"]["effective_rank"] == r["sensors"]["effective_rank"]
               for r in stats["layers"].values())
    assert torch.isfinite(torch.tensor(guard.metrics()["penalty"]))


class _TwoDevices(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 64).to("cuda:0")
        self.b = torch.nn.Linear(64, 64).to("cuda:1")

    def forward(self, x):
        return {"loss": self.b(self.a(x).to("cuda:1")).square().mean()}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_penalty_lands_on_the_loss_device():
    model = _TwoDevices()
    guard = spectral_guard.instrument(model, ratio=1.0,
                                      thresholds=thresholds(effective_rank_retention_min=2.0))
    guard.step()
    out = model(torch.randn(8, 64, device="cuda:0"))
    assert out["loss"].device == torch.device("cuda:1") and guard.metrics()["penalty"] > 0
    out["loss"].backward()
    assert model.a.parametrizations.weight.original.grad.device == torch.device("cuda:0")
    model(torch.randn(8, 64, device="cuda:0"))
    assert guard.penalty().device == torch.device("cuda:1")  # default: the last layer's


@cuda
def test_matrix_sign_on_the_device_matches_the_svd_and_makes_no_host_sync():
    from spectral_guard.guard.msign import msign_, polar_exact

    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 384, generator=g) @ torch.diag(torch.logspace(0, -2, 384))
    expected = polar_exact(W) * (W.double().norm() / polar_exact(W).norm())
    Wd = W.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        msign_(Wd)   # Newton-Schulz: matrix products only
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = Wd.double().cpu()
    assert float(out.norm()) == pytest.approx(float(W.double().norm()), rel=1e-4)
    assert float((out - expected).norm() / expected.norm()) < 0.3
    sv = torch.linalg.svdvals(out)
    assert float(sv[0] / sv[-1]) < 2.0   # the spectrum is flattened (W's is 100)


class _Placed(torch.nn.Module):
    """TinyGPT (2 blocks, d=64) with its embeddings and first block on ``first`` and the rest
    on ``second``; the same seed gives the same weights wherever it is placed."""

    def __init__(self, first: str, second: str, seed: int = 0) -> None:
        super().__init__()
        self.first, self.second = torch.device(first), torch.device(second)
        inner = seeded_model(seed, n_layers=2, d=64, seq=64)
        for part in (inner.wte, inner.wpe, inner.blocks[0]):
            part.to(self.first)
        for part in (inner.blocks[1], inner.ln_f, inner.lm_head):
            part.to(self.second)
        self.inner = inner

    def forward(self, idx, targets=None):
        inner, t = self.inner, idx.shape[1]
        idx = idx.to(self.first)
        x = inner.wte(idx) + inner.wpe(torch.arange(t, device=self.first))
        x = inner.blocks[1](inner.blocks[0](x).to(self.second))
        logits = inner.lm_head(inner.ln_f(x))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 targets.to(self.second).flatten())
        return {"logits": logits, "loss": loss}


def _readings(guard) -> dict:
    """Per layer: the step its latest reading was taken at, and the reading's sensors."""
    return {name: (row["last_checked_step"], row["sensors"])
            for name, row in guard.stats()["layers"].items()}


def _assert_same_readings(gpu: dict, cpu: dict, step: int) -> None:
    assert gpu.keys() == cpu.keys()
    for name, (at, sensors) in gpu.items():
        assert at == cpu[name][0], (step, name)
        for key, value in sensors.items():
            ref = cpu[name][1][key]
            if isinstance(ref, float) and math.isnan(ref):
                assert math.isnan(value), (step, name, key)
            else:
                assert value == pytest.approx(ref, rel=1e-3, abs=1e-6), (step, name, key)


def _train_twins(first: str, second: str, steps: int = 6) -> tuple:
    """The model placed on (first, second) and its CPU twin, stepped together on the same
    batches (every layer treated: penalty terms on both devices, summed on the loss's); after
    each step the guard's readings must equal the twin's, and the losses too."""
    torch.cuda.set_device(0)
    cfg = dict(ratio=0.5, thresholds=thresholds(effective_rank_retention_min=2.0))
    models = {"gpu": _Placed(first, second), "cpu": _Placed("cpu", "cpu")}
    guards = {k: spectral_guard.instrument(m, **cfg) for k, m in models.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-2) for k, m in models.items()}
    for step, (x, y) in enumerate(byte_batches(synthetic_text(8000), 4, 64, steps, seed=0)):
        losses = {}
        for k, model in models.items():
            loss = model(x, y)["loss"]
            loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            losses[k] = float(loss.detach())
        assert losses["gpu"] == pytest.approx(losses["cpu"], rel=1e-3), step
        _assert_same_readings(_readings(guards["gpu"]), _readings(guards["cpu"]), step)
    assert torch.cuda.current_device() == 0   # the guard did not move the current device
    for k in ("gpu", "cpu"):
        totals = guards[k].stats()["totals"]
        assert totals["checks"] >= steps and totals["treated_layers"] > 0
        assert totals["failed_checks"] == 0 and totals["nonfinite_layers"] == 0
    gpu_m, cpu_m = guards["gpu"].metrics(), guards["cpu"].metrics()
    assert gpu_m["attention_logit_scale"] == pytest.approx(cpu_m["attention_logit_scale"],
                                                           rel=1e-3)
    assert gpu_m["penalty"] == pytest.approx(cpu_m["penalty"], rel=1e-3) and cpu_m["penalty"] > 0
    return models, guards


@cuda
def test_a_model_on_the_current_device_reads_as_its_cpu_twin():
    _train_twins("cuda:0", "cuda:0")


@two_gpus
def test_a_model_on_cuda1_with_cuda0_current_reads_as_its_cpu_twin():
    """The non-blocking copy runs on cuda:1's stream: its event must be recorded there (an
    event on the current device's stream lets the worker read the buffer too early)."""
    models, guards = _train_twins("cuda:1", "cuda:1")
    W = models["gpu"].inner.blocks[0].fc.parametrizations.weight.original
    assert W.device == torch.device("cuda:1")
    assert guards["gpu"].penalty().device == torch.device("cuda:1")


@two_gpus
def test_a_model_split_over_two_devices_reads_as_its_cpu_twin():
    """First block on cuda:0, second on cuda:1: one copy and one event per device."""
    models, guards = _train_twins("cuda:0", "cuda:1")
    inner = models["gpu"].inner
    assert inner.blocks[0].fc.parametrizations.weight.original.device == torch.device("cuda:0")
    assert inner.blocks[1].fc.parametrizations.weight.original.device == torch.device("cuda:1")
    model = models["gpu"]
    x, y = next(byte_batches(synthetic_text(8000), 4, 64, 1, seed=1))
    model(x, y)
    assert guards["gpu"].penalty().device == torch.device("cuda:1")   # the last layer's


class _OneLayer(torch.nn.Module):
    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(W)

    def forward(self, x):
        return {"loss": self.layer(x).square().mean()}


def _rank6() -> torch.Tensor:
    """Rank 6 plus a 2e-4 noise floor: a bf16 Gram matrix reads it at about 15."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(256, 6, generator=g), torch.randn(6, 256, generator=g)
    return 0.02 * (A @ B) / 6**0.5 + 2e-4 * torch.randn(256, 256, generator=g)


def _erank_after_one_check(device: str, autocast: bool) -> float:
    model = _OneLayer(_rank6()).to(device)
    guard = spectral_guard.instrument(model, ratio=1.0, biopsy_limit=256, step_on="manual")
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(torch.ones(4, 256, device=device))["loss"]
        loss.backward()
        guard.step()   # the check launched under autocast, as in a loop stepping inside it
    guard.step()       # ... and applied
    return guard.stats()["layers"]["layer"]["sensors"]["effective_rank"]


@cuda
def test_bf16_autocast_reads_a_low_rank_layer_as_fp32():
    fp32 = _erank_after_one_check("cuda", autocast=False)
    assert 6.0 <= fp32 <= 10.0   # rank 6 plus the noise floor (6.31 on CPU)
    assert _erank_after_one_check("cuda", autocast=True) == pytest.approx(fp32, rel=1e-4)
    assert _erank_after_one_check("cpu", autocast=False) == pytest.approx(fp32, rel=1e-4)


@cuda
def test_block_guard_under_bf16_autocast_reads_float32_and_makes_no_host_sync():
    """Every block treated (tiny target): the hooks' readings are float32 under bf16 autocast,
    match an fp32 forward of the same weights, and the steps make no host sync."""
    model = _OnDevice(3).cuda()
    guard = spectral_guard.instrument(model, block_max_update=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _batches(6, "cuda")
    for i, (x, y) in enumerate(batches[:5]):
        if i == 3:   # warm-up done, the blocks treated since step 2
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with SyncProbe() as probe:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, y)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert [str(r) for r in probe.from_package()] == []
    assert guard.metrics()["block_treated"] == 2
    x, _ = batches[5]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, batches[5][1])
    got = [u.item() for u in guard.blocks._latest]
    assert all(u.dtype == torch.float32 for u in guard.blocks._latest)
    with torch.no_grad():
        inner = model.inner
        h = inner.wte(x) + inner.wpe(torch.arange(x.shape[1], device=x.device))
        ref = []
        for block in inner.blocks:
            out = block(h)
            ref.append(math.sqrt(((out.double() - h.double()) ** 2).mean().item()))
            h = out
    assert got == pytest.approx(ref, rel=0.05)   # bf16 matmuls inside the blocks
    guard.remove()
