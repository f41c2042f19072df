"""Two DDP ranks (gloo, CPU) on different data end with identical weights and guard state,
with either ``broadcast_buffers`` setting and with gradient accumulation under ``no_sync()``;
a layer collapsed before ``instrument()`` is penalized on both ranks. The guard itself never
communicates: its choices are functions of (seed, step, layer name) and of the weights, which
DDP keeps identical."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 5


def _worker(rank: int, world: int, rdv: str, out_dir: str, broadcast: bool, micro: int,
            alarm: bool) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from guard_models import byte_batches, seeded_model, synthetic_text, thresholds

    import spectral_guard

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = seeded_model(0, n_layers=2, d=32, seq=16)
        with torch.no_grad():  # collapsed before instrument(): only the absolute rule sees it
            W = model.blocks[0].fc.weight
            W.copy_(torch.outer(W[:, 0], W[0]))
        # alarm: an attention target no pair meets raises the alarm from the first reading,
        # so the matrix sign and the learning-rate back-off act at steps 2 and 4
        extra = {"msign_every": 2, "attention_max_scale": 1e-6} if alarm else {}
        guard = spectral_guard.instrument(
            model, ratio=0.25, thresholds=thresholds(effective_rank_retention_min=0.999,
                                                     effective_rank_ratio_min=0.2,
                                                     collapse_min_dim=8), **extra)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        sampled, fc_lambda = [], []
        # each rank sees different data: the guard's choices must not depend on it
        data = list(byte_batches(synthetic_text(6000, seed=rank), 2, 16, STEPS * micro,
                                 seed=rank))
        for step in range(STEPS):
            sampled.append(guard.sampled_layers())
            for k in range(micro):
                x, y = data[step * micro + k]
                if k < micro - 1:
                    with ddp.no_sync():  # accumulate locally, all-reduce on the last one
                        (ddp(x, y)["loss"] / micro).backward()
                else:
                    (ddp(x, y)["loss"] / micro).backward()
            opt.step()
            opt.zero_grad()
            fc_lambda.append(guard.stats()["layers"]["blocks.0.fc"]["lambda"])
        torch.save({"sampled": sampled, "guard": guard.state_dict(), "fc_lambda": fc_lambda,
                    "params": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broadcast,micro,alarm", [(False, 1, False), (True, 1, False),
                                                   (False, 2, False), (False, 1, True)])
def test_ranks_agree_on_weights_and_guard_state(tmp_path, broadcast, micro, alarm):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path), broadcast, micro, alarm),
             nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert r0["sampled"] == r1["sampled"] and len(r0["sampled"]) == STEPS
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
    assert r0["guard"]["step"] == r1["guard"]["step"] == STEPS
    for name, saved in r0["guard"]["layers"].items():
        other = r1["guard"]["layers"][name]
        assert repr(saved["state"]) == repr(other["state"]), name  # host state, nan == nan
        for key, t in saved["tensors"].items():
            torch.testing.assert_close(t, other["tensors"][key], rtol=0, atol=0,
                                       equal_nan=True, msg=f"{name} {key}")
    # the layer collapsed before instrument() is treated on both ranks from step 1 on
    assert r0["fc_lambda"] == r1["fc_lambda"] and all(lam > 0 for lam in r0["fc_lambda"])
    assert r0["guard"]["lr_backoff"] == r1["guard"]["lr_backoff"]
    assert r0["guard"]["msign_alarm_seen"] == r1["guard"]["msign_alarm_seen"]
    if alarm:   # both ranks signed and backed off at the same steps
        backoff = r0["guard"]["lr_backoff"]   # graded: the same scale on both ranks (above)
        assert backoff["scale"] < 1.0 and backoff["backoffs"] >= 1
        assert sum(v["state"]["msigns"] for v in r0["guard"]["layers"].values()) > 0
