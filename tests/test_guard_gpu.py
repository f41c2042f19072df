"""GPU paths: no host synchronization in guarded steps, fp16 autocast with GradScaler, and a
model spread over two devices. Skipped without CUDA (CI has none); run on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from guard_models import byte_batches, seeded_model, synthetic_text, thresholds

import spectral_guard

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
        for x, y in batches[3:]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, y)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
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
