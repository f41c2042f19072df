"""Two DDP ranks (gloo, CPU) make the same guard choices without the guard communicating."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, rdv: str, out_dir: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from guard_models import byte_batches, seeded_model, synthetic_text, thresholds

    import spectral_guard

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        model = seeded_model(0, n_layers=2, d=32, seq=16)
        guard = spectral_guard.instrument(
            model, ratio=0.25, thresholds=thresholds(effective_rank_retention_min=0.999))
        # broadcast_buffers=False: the probes' state must agree without being synchronized
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        sampled = []
        # each rank sees different data: the guard's choices must not depend on it
        for x, y in byte_batches(synthetic_text(4000, seed=rank), 2, 16, 5, seed=rank):
            sampled.append(guard.sampled_layers())
            ddp(x, y)["loss"].backward()
            opt.step()
            opt.zero_grad()
        torch.save({"sampled": sampled, "guard": guard.state_dict(),
                    "checked": {n: r["last_checked_step"]
                                for n, r in guard.stats()["layers"].items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_ranks_agree_on_schedule_and_state(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert r0["sampled"] == r1["sampled"] and len(r0["sampled"]) == 5
    assert r0["checked"] == r1["checked"]
    assert r0["guard"]["step"] == r1["guard"]["step"] == 5
    for name, saved in r0["guard"]["layers"].items():
        other = r1["guard"]["layers"][name]
        assert repr(saved["state"]) == repr(other["state"]), name  # host state, nan == nan
        for key, t in saved["tensors"].items():
            torch.testing.assert_close(t, other["tensors"][key], rtol=0, atol=0,
                                       equal_nan=True, msg=f"{name} {key}")
